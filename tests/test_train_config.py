"""Train config parsing and validation, schedules, and the AdamW optimizer."""
import math
import os
import tomllib

import pytest
import torch

from nanoseek.train import config as tc
from nanoseek.train.optim import AdamW
from nanoseek.train.schedule import learning_rate, piecewise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_toml_and_yaml_read_the_same(tmp_path):
    a = tc.load(write(tmp_path, '[optim]\nlr = 1e-3\n[model]\npreset = "tiny"\nhidden_size = 32\n'))
    b = tc.load(write(tmp_path, "optim:\n  lr: 0.001\nmodel:\n  preset: tiny\n  hidden_size: 32\n", "c.yaml"))
    assert a == b and a.optim.lr == 1e-3 and a.model.overrides == {"hidden_size": 32}


@pytest.mark.parametrize("text, message", [
    ("[optim]\nlrr = 1e-3\n", "unknown train config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("[optimizer]\nlr = 1e-3\n", "unknown train config key 'optimizer'; did you mean 'optim'?"),
    ("[model]\nhiden_size = 64\n", "unknown train config key 'model.hiden_size'; did you mean 'model.hidden_size'?"),
    ("[optim]\nlr = -1.0\n", "train config 'optim.lr' must be a positive number (got -1.0)"),
    ("[optim]\nlr = \"fast\"\n", "train config 'optim.lr' must be float, got 'fast'"),
    ("[run]\nsteps = 0\n", "train config 'run.steps' must be > 0 (got 0)"),
    ("[schedule]\nkind = \"linear\"\n", "train config 'schedule.kind' must be 'cosine' or 'wsd' (got 'linear')"),
    ("[run]\nrecompute = \"all\"\n",
     "train config 'run.recompute' must be 'none', 'cheap', 'v3' or 'full' (got 'all')"),
    ("[mtp]\nlambda_switch = 2\n", "train config 'mtp.lambda_switch' must be in [0, 1] (got 2.0)"),
    ("[run]\nstep_graph = true\ndevice = \"cpu\"\n",
     "train config 'run.step_graph' needs run.compile = true and a CUDA device (got True)"),
    ("[optim\nlr = 1\n", "cannot parse"),
])
def test_bad_configs_name_the_problem(tmp_path, text, message):
    with pytest.raises(ValueError) as e:
        tc.load(write(tmp_path, text))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="train config not found: nope.toml"):
        tc.load("nope.toml")


def test_overrides_and_reference():
    cfg = tc.load(None, ["optim.lr=2e-3", "run.out_dir=runs/x", "ema.enabled=true"])
    assert (cfg.optim.lr, cfg.run.out_dir, cfg.ema.enabled) == (2e-3, "runs/x", True)
    # the reference file is exactly what --print-config prints, and it loads back to the defaults
    with open(os.path.join(REPO, "configs", "reference.toml")) as f:
        assert f.read() == tc.reference_toml()
    assert tc.from_dict(tomllib.loads(tc.reference_toml())) == tc.TrainConfig()
    for name in ("demo.toml", "small.yaml"):
        tc.load(os.path.join(REPO, "configs", name))


def test_lr_schedules():
    kw = dict(total=100, peak=1.0, warmup=10, decay_fraction=0.2, min_ratio=0.1)
    cos = [learning_rate(s, kind="cosine", **kw) for s in range(100)]
    wsd = [learning_rate(s, kind="wsd", **kw) for s in range(100)]
    assert cos[0] == 0.1 and cos[9] == 1.0 and math.isclose(cos[99], 0.1)
    assert all(a >= b for a, b in zip(cos[9:], cos[10:]))
    assert wsd[9:80] == [1.0] * 71 and math.isclose(wsd[99], 0.1) and wsd[90] < 1.0
    assert [piecewise(s, 10, 0.3, 0.1, 0.7) for s in (0, 6, 7, 9)] == [0.3, 0.3, 0.1, 0.1]


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_torch(fused, monkeypatch):
    """Both ways of stepping (torch's fused kernel for fp32 moments on plain tensors, foreach ops otherwise, e.g.
    for FSDP2's DTensors) give torch's AdamW."""
    if not fused:
        monkeypatch.setattr(AdamW, "_one_pass", lambda self, params: None)
    torch.manual_seed(0)
    ref = torch.nn.Linear(8, 4)
    ours = torch.nn.Linear(8, 4)
    ours.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = AdamW(ours.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert opt._one_pass(list(ours.parameters())) == ("torch" if fused else None)
    for _ in range(5):
        x = torch.randn(16, 8)
        for m, o in ((ref, opt_ref), (ours, opt)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_moments_survive_a_state_dict_round_trip():
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = AdamW([p], lr=1e-2, moment_dtype=torch.bfloat16)
    p.grad = torch.randn(5, 3)
    opt.step()
    state = opt.state_dict()
    opt2 = AdamW([p], lr=1e-2, moment_dtype=torch.bfloat16)
    opt2.load_state_dict(state)
    s = opt2.state[p]
    assert s["exp_avg"].dtype == torch.bfloat16 and s["step"] == 1
    assert torch.equal(s["exp_avg"], opt.state[p]["exp_avg"])
