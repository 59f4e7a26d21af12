"""`nanoseek grpo`: Group Relative Policy Optimization with rule-based rewards (DeepSeekMath §4, R1 §2.2).

One step:
  1. rollouts   prompts_per_step training problems, group_size samples each, from the current policy through
                the inference engine (continuous batching, latent cache, CUDA graphs on GPU; rollout.py)
  2. rewards    accuracy (the task's check of the final answer) + format_weight · format (rewards.py)
  3. advantage  A_i = (r_i − mean) / (std + eps) within each group (grpo_loss.py)
  4. π_old      log-probabilities of the sampled tokens under the policy before this step's updates, and
                π_ref's under the frozen reference (the starting checkpoint) when β > 0
  5. updates    `epochs` passes over the rollouts in `minibatches` shuffled minibatches, one optimizer step
                each: minimize the clipped GRPO loss with the k3 KL penalty (grpo_loss.py, normalization
                "seq" or "token", optionally truncated importance weights for the engine's numerics); after
                the first update π_θ ≠ π_old and the clip range matters
Metrics per step (progress bar, metrics.jsonl, plot): reward, accuracy, format, response length, KL, clip
fraction, the rollouts' KL to π_old (engine against trainer numerics: near 0 when on-policy), rollout tokens/s
and the share of the step spent generating; held-out accuracy (greedy, and pass@1 / maj@k over eval_samples
samples at T = 0.6) every eval_every steps. Checkpoints every checkpoint_every steps resume exactly: the problems
of a step and the seeds of its samples are functions of (seed, step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..eval.gen import evaluate, prompts_of
from ..train.config import knob
from .grpo_loss import NORMS, group_advantages, grpo_loss
from .logprobs import batch, completion_logprobs
from .rewards import score
from .rollout import Timing, make_engine, sample
from .run import Run
from .tasks import get_task


@dataclass
class GRPOConfig:
    task: str = knob("arithmetic", "built-in task (addition, arithmetic, countdown[:ARG]) or a question/answer JSONL")
    answer_pattern: str | None = knob(None, "regex whose last match (group 1) is the answer when there is no "
                                            "\\boxed{} (JSONL tasks)")
    steps: int = knob(100, "GRPO steps (rollout batches)")
    time_limit: float = knob(0.0, "seconds after which no further step starts (counted from the start of this "
                                  "invocation, evaluations included); the run then evaluates, saves and exports "
                                  "as at its last step. 0: no limit")
    prompts_per_step: int = knob(32, "training problems per step")
    group_size: int = knob(8, "G: samples per problem")
    max_new_tokens: int = knob(96, "longest response")
    temperature: float = knob(1.0, "rollout sampling temperature (R1: 1.0)")
    epochs: int = knob(1, "passes over each step's rollouts")
    minibatches: int = knob(2, "optimizer steps per pass: epochs × minibatches updates per rollout batch")
    micro_batch: int = knob(128, "sequences per forward/backward (memory only; the loss is the same)")
    clip_eps: float = knob(0.2, "ε of the clipped policy ratio")
    beta: float = knob(0.04, "β of the k3 KL penalty to the reference (DeepSeekMath: 0.04); 0: no reference")
    loss_norm: str = knob("seq", "'seq': token mean per response, then mean over responses (DeepSeekMath, R1); "
                                 "'token': mean over all tokens (DAPO)")
    tis_cap: float = knob(0.0, "C of the truncated importance weight min(π_old / π_engine, C) on each token's "
                               "surrogate, for the engine's numerics differing from the trainer's (0: off)")
    format_weight: float = knob(0.1, "reward = accuracy + format_weight × format")
    lr: float = knob(1e-5, "learning rate")
    warmup_steps: int = knob(0, "linear warmup steps")
    min_lr_ratio: float = knob(1.0, "final lr as a fraction of lr (cosine decay; 1: constant)")
    weight_decay: float = knob(0.0, "AdamW decoupled weight decay on matrices")
    grad_clip: float = knob(1.0, "clip the global gradient norm (0: off)")
    seed: int = knob(0, "seed of the problems and of the rollout samples")
    eval_every: int = knob(10, "steps between held-out evaluations (0: at the start and end only)")
    eval_problems: int = knob(200, "held-out problems per evaluation (greedy)")
    eval_samples: int = knob(4, "k: also sample each held-out problem k times at T = 0.6 for pass@1 and maj@k "
                                "(R1's pass@1); 1: greedy only")
    checkpoint_every: int = knob(50, "steps between checkpoints (0: only at the end and on Ctrl-C)")

    def validate(self):
        if self.loss_norm not in NORMS:
            raise ValueError(f"loss_norm must be one of {NORMS}, got {self.loss_norm!r}")
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2: advantages compare samples of one prompt")
        if self.time_limit < 0:
            raise ValueError(f"time_limit must be 0 (none) or positive seconds, got {self.time_limit}")
        if self.tis_cap < 0:
            raise ValueError(f"tis_cap must be 0 (off) or positive, got {self.tis_cap}")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError("minibatches must divide prompts_per_step × group_size")


class GRPO:
    def __init__(self, cfg: GRPOConfig, init: str | None, out_dir: str, device: str = "auto",
                 resume: bool = False, log=print):
        cfg.validate()
        self.run = Run("grpo", cfg, init, out_dir, device, resume, log)
        self.cfg, self.log = self.run.config, log
        self.task = get_task(self.cfg.task, self.cfg.answer_pattern)
        self.tok, self.model = self.run.tokenizer, self.run.model
        self.ref = None
        if self.cfg.beta:
            from ..io import load_hf
            from ..train.checkpoint import model_dir
            self.ref = load_hf(model_dir(self.run.init), dtype=torch.float32, device=self.run.device).eval()
            self.ref.requires_grad_(False)
        self.heldout = self.task.problems("test", self.cfg.eval_problems)
        # the engine decodes with the policy's own weights: rollouts always come from the current π_θ
        known = getattr(self.task, "all", None) or self.heldout + self._problems(0)   # a file task: all of it
        longest = max(len(p) for p in prompts_of(self.tok, self.task, known))
        self.max_len = longest + 32 + self.cfg.max_new_tokens
        self.engine = make_engine(self.model, self.tok, max_batch=self.cfg.prompts_per_step * self.cfg.group_size,
                                  max_len=self.max_len)
        self.pad_id = self.tok.pad_id if self.tok.pad_id is not None else self.tok.eos_id

    def _problems(self, step: int):
        return self.task.problems("train", self.cfg.prompts_per_step, seed=self.cfg.seed * 1_000_003 + step)

    # ---- one step ----------------------------------------------------------------------------------------------
    def rollouts(self, step: int, timing: Timing):
        cfg = self.cfg
        problems = self._problems(step)
        prompts = prompts_of(self.tok, self.task, problems)
        groups = sample(self.engine, prompts, cfg.group_size, cfg.max_new_tokens, temperature=cfg.temperature,
                        seed=(cfg.seed * 1_000_003 + step) * 65536, timing=timing)
        self.model.train()
        rewards = [[score(c.text, self.task, p, cfg.format_weight) for c in g] for g, p in zip(groups, problems)]
        return problems, prompts, groups, rewards

    @torch.no_grad()
    def _logprobs(self, model, data, idx):
        out = []
        for lo in range(0, len(idx), self.cfg.micro_batch):
            mb = idx[lo: lo + self.cfg.micro_batch]
            ids, start, targets, mask = self._tensors(data, mb)
            with self.run.autocast():
                out.append(completion_logprobs(model, ids, start, targets, mask))
        return out

    def _tensors(self, data, idx):
        prompts, completions = data
        return batch([prompts[i] for i in idx], [completions[i] for i in idx], self.pad_id, self.run.device)

    def step(self) -> dict:
        cfg, run = self.cfg, self.run
        t0 = time.perf_counter()
        lr = run.lr()
        timing = Timing()
        problems, prompts, groups, rewards = self.rollouts(run.step, timing)

        G, n = cfg.group_size, cfg.prompts_per_step * cfg.group_size
        data = ([p for p in prompts for _ in range(G)], [c.ids for g in groups for c in g])
        lengths = [len(c) for c in data[1]]
        total = torch.tensor([[r.total for r in g] for g in rewards])
        adv = group_advantages(total).flatten().to(run.device)
        # π_old and π_ref of every sampled token, once, before any update of this step
        order = list(range(n))
        old = self._per_sequence(self._logprobs(self.model, data, order), lengths)
        ref = self._per_sequence(self._logprobs(self.ref, data, order), lengths) if self.ref is not None else None
        # the rollouts' own log-probabilities against π_old's: E[log q − log π_old] over tokens sampled from the
        # engine's q estimates KL(q ‖ π_old), which is 0 when the rollouts really come from the policy trained
        sampled = [torch.tensor(c.logprobs, device=o.device) for c, o in zip((c for g in groups for c in g), old)]
        gap = torch.cat([q - o for q, o in zip(sampled, old)])
        tis = [(o - q).exp().clamp(max=cfg.tis_cap) for o, q in zip(old, sampled)] if cfg.tis_cap else None

        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + run.step)
        size = n // cfg.minibatches
        sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio": 0.0}
        seen = 0
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=g).tolist()
            for m in range(cfg.minibatches):
                mb = perm[m * size: (m + 1) * size]
                n_tokens = sum(lengths[i] for i in mb)
                for lo in range(0, len(mb), cfg.micro_batch):
                    idx = mb[lo: lo + cfg.micro_batch]
                    ids, start, targets, mask = self._tensors(data, idx)
                    with run.autocast():
                        logp = completion_logprobs(self.model, ids, start, targets, mask)
                    loss, st = grpo_loss(logp, _pad([old[i] for i in idx]),
                                         _pad([ref[i] for i in idx]) if ref is not None else None, adv[idx], mask,
                                         cfg.clip_eps, cfg.beta, cfg.loss_norm, n_outputs=len(mb), n_tokens=n_tokens,
                                         weights=_pad([tis[i] for i in idx]) if tis is not None else None)
                    loss.backward()
                    tokens = int(mask.sum())
                    sums["loss"] += loss.item()
                    for k in ("kl", "clip_frac", "ratio"):
                        sums[k] += getattr(st, k).item() * tokens
                    seen += tokens
                grad_norm = run.optimizer_step(lr)
        run.step += 1
        dt = time.perf_counter() - t0
        flat = [r for grp in rewards for r in grp]
        return {"split": "train", "step": run.step, "reward": sum(r.total for r in flat) / n,
                "accuracy": sum(r.accuracy for r in flat) / n, "format": sum(r.format for r in flat) / n,
                "length": sum(lengths) / n, "truncated": sum(not c.finished for grp in groups for c in grp) / n,
                # groups whose samples all scored the same have zero advantage: no policy gradient from them
                "flat_groups": float((total.std(dim=1) == 0).float().mean()),
                "loss": sums["loss"] / (cfg.epochs * cfg.minibatches), "kl": sums["kl"] / max(seen, 1),
                "clip_frac": sums["clip_frac"] / max(seen, 1), "ratio": sums["ratio"] / max(seen, 1),
                "grad_norm": grad_norm, "lr": lr, "rollout_kl": float(gap.mean()),
                "rollout_max_gap": float(gap.abs().max()), "rollout_tok_per_s": timing.tokens_per_s,
                "rollout_tokens": timing.tokens, "gen_share": timing.seconds / dt, "time": dt}

    @staticmethod
    def _per_sequence(chunks: list[torch.Tensor], lengths: list[int]) -> list[torch.Tensor]:
        rows = [row for chunk in chunks for row in chunk]
        return [row[:n] for row, n in zip(rows, lengths)]

    def evaluate(self) -> dict:
        scores = evaluate(self.engine, self.task, self.heldout, k=self.cfg.eval_samples,
                          max_tokens=self.cfg.max_new_tokens)
        self.model.train()
        return scores

    # ---- the run -----------------------------------------------------------------------------------------------
    def fit(self, progress: bool = True) -> dict:
        cfg, run = self.cfg, self.run
        self.log(f"GRPO on {self.task.name}: {cfg.steps} steps × {cfg.prompts_per_step} prompts × G={cfg.group_size}"
                 f", {cfg.epochs * cfg.minibatches} updates per step, β={cfg.beta}, ε={cfg.clip_eps}, "
                 f"{cfg.loss_norm}-normalized loss, on {run.device}; output in {run.out_dir}")
        metrics = run.metrics({"reward": ".3f", "accuracy": ".2f", "length": ".1f", "kl": ".4f", "clip_frac": ".3f",
                               "rollout_tok_per_s": ".0f", "gen_share": ".2f"}, progress)
        summary = {}

        def validate():
            scores = self.evaluate()
            metrics.log({"split": "val", "step": run.step, **scores})
            sampled = f", pass@1 {scores['pass@1']:.1%} at T=0.6" if "pass@1" in scores else ""
            metrics.note(f"step {run.step}: held-out accuracy {scores['exact_match']:.1%} greedy{sampled} "
                         f"(format {scores['format']:.0%}, length {scores['length']:.1f}, "
                         f"{len(self.heldout)} problems)")
            summary.setdefault("start_accuracy", scores["exact_match"])
            summary["accuracy"] = scores["exact_match"]
            if "pass@1" in scores:
                summary.setdefault("start_pass@1", scores["pass@1"])
                summary["pass@1"] = scores["pass@1"]

        records, start = [], time.time()
        try:
            if run.step == 0:
                validate()
            while run.step < cfg.steps and not (records and 0 < cfg.time_limit <= time.time() - start):
                rec = self.step()
                records.append(rec)
                metrics.log(rec)
                if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.steps:
                    validate()
                if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps:
                    run.save()
        except KeyboardInterrupt:
            run.save()
            metrics.close()
            self.log(f"\nstopped at step {run.step}; checkpoint saved, continue with --resume")
            raise
        validate()
        metrics.close()
        run.save()
        from .plot import plot_grpo
        if records:
            summary["rollout_tok_per_s"] = sum(r["rollout_tokens"] for r in records) / sum(
                r["gen_share"] * r["time"] for r in records)
            summary["gen_share"] = sum(r["gen_share"] * r["time"] for r in records) / sum(r["time"] for r in records)
        summary.update(step=run.step, final=run.export(), plot=plot_grpo(run.out_dir))
        return summary


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def grpo(cfg: GRPOConfig, init: str | None, out_dir: str, device: str = "auto", resume: bool = False,
         progress: bool = True, log=print) -> dict:
    return GRPO(cfg, init, out_dir, device, resume, log).fit(progress)
