"""`nanoseek serve` as a real process on loopback, driven by the official `openai` client; and `nanoseek chat`.

One tiny random checkpoint (weights + tokenizer files) is written per module; the server runs with 8 slots so
that the concurrent requests queue, join and leave. Greedy answers are checked against `generate` on the same
checkpoint (in-process, and once through `nanoseek generate`).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from nanoseek.config import preset  # noqa: E402
from nanoseek.data.tokenizer import train_tokenizer  # noqa: E402
from nanoseek.infer.generate import generate  # noqa: E402
from nanoseek.infer.load import load  # noqa: E402
from nanoseek.io import save_hf  # noqa: E402

from .helpers import random_model  # noqa: E402

KEY = "test-key"
CONTEXT = 1024
CORPUS = ["the quick brown fox jumps over the lazy dog. ", "hello world, hello nanoseek! ",
          "naïve café 東京 🙂 ", "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9 "]
PROMPTS = ["hello world", "the quick brown fox", "naïve café", "a b c", "lazy dog", "東京"]


def write_checkpoint(d: str):
    tok = train_tokenizer(CORPUS * 20, 320)
    tok.save(d)
    cfg = preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    save_hf(random_model(cfg), d)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: str, *extra: str):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--ckpt", ckpt, "--port", str(port),
                             "--max-len", str(CONTEXT), "--max-batch", "8", "--model-name", "tiny", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not come up in 60 s")


def stop_server(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    proc.stdout.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_ckpt"))
    write_checkpoint(d)
    return d


@pytest.fixture(scope="module")
def reference(ckpt):
    """Greedy completions by `generate` on the same checkpoint, in-process."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = load(ckpt)
    torch.set_num_threads(n)

    def complete(prompts, max_tokens, stop=None):
        torch.set_num_threads(1)
        try:
            return generate(model, tok, prompts, max_new_tokens=max_tokens, stop=stop)
        finally:
            torch.set_num_threads(n)
    return complete, tok


@pytest.fixture(scope="module")
def server(ckpt):
    proc, base = start_server(ckpt, "--api-key", KEY, "--max-waiting", "64", "--max-body-bytes", "20000")
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_health_and_models(server, client):
    assert httpx.get(server + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_matches_generate(client, reference):
    complete, _ = reference
    got = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0) for p in PROMPTS[:3]]
    assert [r.choices[0].text for r in got] == complete(PROMPTS[:3], 12)
    r = got[0]
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # a list of prompts with n choices each: index = prompt * n + choice; greedy choices coincide
    r = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [x for x in complete(PROMPTS[:2], 6) for _ in range(2)]


def test_nanoseek_generate_cli_agrees(ckpt, client):
    out = subprocess.run([sys.executable, "-m", "nanoseek", "generate", "--ckpt", ckpt, "--prompt", PROMPTS[0],
                          "--prompt", PROMPTS[1], "--max-new-tokens", "10", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    for p in PROMPTS[:2]:
        text = client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text
        assert f"{p}{text}\n" + "-" * 40 in out.stdout


def test_chat_matches_generate(client, reference):
    complete, tok = reference
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == complete([prompt], 10)[0]
    assert r.usage.prompt_tokens == len(tok.encode(prompt))


def test_streaming(client):
    kw = dict(model="tiny", prompt="the quick brown fox", max_tokens=16, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    messages = [{"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content


def test_stop_strings(client, reference):
    complete, _ = reference
    text = complete([PROMPTS[0]], 24)[0]
    stop = text[3:5] if len(text) >= 5 else None
    if stop is None:
        pytest.skip("the greedy completion is too short to cut")
    want = text[: text.find(stop)]
    assert complete([PROMPTS[0]], 24, stop=[stop])[0] == want
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", prompt="hello", max_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_bad_requests(server, client):
    bad = [dict(temperature=3.0), dict(top_p=0.0), dict(n=0), dict(n=100), dict(max_tokens=0),
           dict(max_tokens=10_000), dict(stop=[""]), dict(logprobs=2), dict(echo=True), dict(prompt=[]),
           dict(prompt=123), dict(prompt=[1, 2, 10**6]), dict(seed=2**70)]
    for kw in bad:
        args = {"model": "tiny", "prompt": "hello", **kw}
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**args)
        assert e.value.body["type"] == "invalid_request_error", kw
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="hello " * 1100, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * 1100}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hello")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server + "/v1/completions", json={"prompt": "x" * 30000}, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # 32 prompts x n=8 = 256 choices > 64 waiting: refused whole with 503, nothing left behind
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="tiny", prompt=["hi"] * 32, n=8, max_tokens=4)
    assert e.value.status_code == 503
    _wait_idle(server)


def test_32_concurrent_requests(client, reference):
    complete, _ = reference
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    with ThreadPoolExecutor(32) as ex:
        got = list(ex.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)
                          .choices[0].text, prompts))
    assert got == complete(prompts, 8)


def test_disconnect_mid_stream_frees_the_slot(server):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": CONTEXT - 8, "stream": True, "ignore_eos": True}
    cancelled = httpx.get(server + "/health").json().get("cancelled", 0)
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        # the connection is closed here, long before max_tokens
    _wait_idle(server)
    assert httpx.get(server + "/health").json()["cancelled"] == cancelled + 1


def _wait_idle(server, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = httpx.get(server + "/health").json()
        if h["running"] == 0 and h["waiting"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"requests still running: {h}")


def test_ctrl_c_drains_then_exits(ckpt):
    proc, base = start_server(ckpt)
    try:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 200, "stream": True, "ignore_eos": True}
        chunks = []
        with httpx.Client(timeout=30) as h, h.stream("POST", base + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line)
                    if len(chunks) == 2:
                        proc.send_signal(signal.SIGINT)
        assert chunks[-1] == "data: [DONE]"            # the stream in flight was finished
        finish = [json.loads(c[6:])["choices"][0]["finish_reason"] for c in chunks[:-1]]
        assert finish[-1] == "length"
        proc.wait(30)                                   # and then the process exits
        with pytest.raises(httpx.HTTPError):
            httpx.get(base + "/health", timeout=1)
    finally:
        stop_server(proc)


def test_chat_cli(ckpt, reference):
    complete, tok = reference
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "nanoseek", "chat", "--ckpt", ckpt, "--temperature", "0",
                          "--max-tokens", "8", "--max-len", str(CONTEXT)], input="hello world\n/exit\n",
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True)
    assert f"bot> {complete([prompt], 8)[0]}\n" in out.stdout
