"""`nanoseek sft`: supervised fine-tuning on chat data, the loss on assistant tokens only (V3 §5.1).

Data: chat JSONL files ({"messages": [...]}, see chat.py) and/or a built-in task, which yields V3's two sample
kinds per problem: <problem, original response> (the plain boxed answer) and <system prompt, problem, reasoning
response> (`<think>` worked solution `</think>` then the boxed answer). Samples are packed into rows with
document masks (chat.py). Loss: the mean next-token cross-entropy over the assistant tokens of a batch, plus
λ times the MTP module's (so that MTP speculative decoding keeps working on the fine-tuned model).
With a task, greedy held-out accuracy is measured along the way (eval/gen.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..train.config import knob
from .chat import encode_chat, pack, read_chat_jsonl
from .run import Run
from .tasks import get_task

KINDS = ("both", "plain", "reasoning")


@dataclass
class SFTConfig:
    data: list = field(default_factory=list, metadata={"doc": "chat JSONL files ({\"messages\": [...]} per line)"})
    task: str | None = knob(None, "built-in task (or question/answer JSONL) to make SFT samples from")
    eval_task: str | None = knob(None, "task whose held-out split is scored (default: --task)")
    problems: int = knob(20000, "training problems of the task to make samples from")
    kinds: str = knob("both", "V3 sample kinds per problem: both | plain (problem -> answer) | reasoning "
                              "(system prompt + problem -> <think>...</think> answer)")
    steps: int = knob(300, "optimizer steps")
    batch_size: int = knob(32, "packed rows per step")
    seq_len: int = knob(512, "tokens per packed row")
    lr: float = knob(1e-4, "peak learning rate (warmup, then cosine decay)")
    warmup_steps: int = knob(20, "linear warmup steps")
    min_lr_ratio: float = knob(0.1, "final lr as a fraction of lr")
    weight_decay: float = knob(0.0, "AdamW decoupled weight decay on matrices")
    grad_clip: float = knob(1.0, "clip the global gradient norm (0: off)")
    mtp_lambda: float = knob(0.1, "weight of the MTP loss (keeps MTP speculative decoding working); 0: off")
    seed: int = knob(0, "seed of the problems, the packing and the batch order")
    eval_every: int = knob(0, "steps between held-out evaluations of the task (0: only at the end)")
    eval_problems: int = knob(200, "held-out problems per evaluation (greedy)")
    max_new_tokens: int = knob(96, "tokens generated per held-out problem")
    checkpoint_every: int = knob(0, "steps between checkpoints (0: only at the end and on Ctrl-C)")


def conversations(cfg: SFTConfig) -> list[list[dict]]:
    if cfg.kinds not in KINDS:
        raise ValueError(f"kinds must be one of {KINDS}, got {cfg.kinds!r}")
    convs = [c for path in cfg.data for c in read_chat_jsonl(path)]
    if cfg.task:
        task = get_task(cfg.task)
        for p in task.problems("train", cfg.problems, cfg.seed):
            samples = task.sft_samples(p)
            # sft_samples gives [plain, reasoning] (reasoning only where the task has worked solutions)
            convs += {"both": samples, "plain": samples[:1], "reasoning": samples[1:]}[cfg.kinds]
    if not convs:
        raise ValueError("no SFT data: pass --data FILE.jsonl and/or --task NAME")
    return convs


def heldout_accuracy(run: Run, task, problems, max_new_tokens: int, engine=None) -> tuple[dict, object]:
    """Greedy held-out scores of the run's model; -> (scores, the engine, for reuse)."""
    from ..eval.gen import evaluate, prompts_of
    from .rollout import make_engine
    if engine is None:
        longest = max(len(p) for p in prompts_of(run.tokenizer, task, problems))
        engine = make_engine(run.model, run.tokenizer, max_batch=min(256, len(problems)),
                             max_len=longest + max_new_tokens + 8)
    scores = evaluate(engine, task, problems, max_tokens=max_new_tokens)
    run.model.train()
    return scores, engine


def sft(cfg: SFTConfig, init: str | None, out_dir: str, device: str = "auto", resume: bool = False,
        progress: bool = True, log=print) -> dict:
    run = Run("sft", cfg, init, out_dir, device, resume, log)
    cfg = run.config
    tok, model = run.tokenizer, run.model
    convs = conversations(cfg)
    packed = pack([encode_chat(tok, c) for c in convs], cfg.seq_len, tok.pad_id if tok.pad_id is not None
                  else tok.eos_id, cfg.seed)
    log(f"SFT on {len(convs)} conversations -> {len(packed.input_ids)} packed rows of {cfg.seq_len} tokens "
        f"({packed.targets} supervised tokens"
        f"{f', {packed.truncated} truncated' if packed.truncated else ''}); {cfg.steps} steps × {cfg.batch_size} rows")
    task = get_task(cfg.eval_task or cfg.task) if (cfg.eval_task or cfg.task) else None
    heldout = task.problems("test", cfg.eval_problems) if task else []
    engine, summary = None, {"accuracy": None}

    def evaluate(metrics):
        nonlocal engine
        scores, engine = heldout_accuracy(run, task, heldout, cfg.max_new_tokens, engine)
        metrics.log({"split": "val", "step": run.step, **scores})
        metrics.note(f"step {run.step}: held-out accuracy {scores['exact_match']:.1%} "
                     f"(format {scores['format']:.0%}, {len(heldout)} problems)")
        summary["accuracy"] = scores["exact_match"]

    metrics = run.metrics({"loss": ".3f", "tok_per_s": ".0f", "lr": ".1e"}, progress)
    try:
        while run.step < cfg.steps:
            t0 = time.perf_counter()
            lr = run.lr()
            x, y, docs = (t.to(run.device) for t in packed.batch(run.step, cfg.batch_size, cfg.seed))
            with run.autocast():
                out = model.loss(x, y, mtp_lambda=cfg.mtp_lambda, doc_ids=docs)
            out.total.backward()
            grad_norm = run.optimizer_step(lr)
            run.step += 1
            rec = {"split": "train", "step": run.step, "loss": out.ce.item(), "ce": out.ce.item(), "lr": lr,
                   "grad_norm": grad_norm, "targets": int((y != -100).sum())}
            if out.mtp is not None:
                rec["mtp"] = out.mtp.item()
            rec["tok_per_s"] = x.numel() / (time.perf_counter() - t0)
            metrics.log(rec)
            if task and cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.steps:
                evaluate(metrics)
            if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps:
                run.save()
    except KeyboardInterrupt:
        run.save()
        metrics.close()
        log(f"\nstopped at step {run.step}; checkpoint saved, continue with --resume")
        raise
    if task:
        evaluate(metrics)
    metrics.close()
    run.save()
    summary.update(step=run.step, final=run.export())
    return summary
