"""`nanoseek eval`: score one checkpoint on multiple-choice files, generation files and built-in tasks; print a
table and write the results (and, per benchmark, what the model answered) as JSON."""
from __future__ import annotations

import json
import os

from . import gen, mc


def table(results: dict) -> str:
    """One line per benchmark: its kind, size and metrics."""
    width = max([len("benchmark")] + [len(name) for name in results])
    lines = [f"{'benchmark':<{width}}  {'kind':<4}  {'n':>5}  metrics", "-" * (width + 40)]
    for name, r in results.items():
        metrics = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                            if k not in ("kind", "n"))
        lines.append(f"{name:<{width}}  {r['kind']:<4}  {r['n']:>5}  {metrics}")
    return "\n".join(lines)


def run_eval(ckpt: str, mc_files: list[str] = (), gen_files: list[str] = (), tasks: list[str] = (),
             tokenizer: str | None = None, device: str = "auto", dtype: str = "auto", limit: int | None = None,
             k: int = 1, temperature: float = 0.6, max_new_tokens: int = 256, style: str = "reasoning",
             answer_pattern: str | None = None, delimiter: str = " ", seed: int = 0, out: str | None = None,
             log=print) -> dict:
    """Results {benchmark: {kind, n, metrics...}}. gen_files are whole JSONL files of {"question", "answer"};
    tasks are built-in task names scored on their held-out split (limit problems, default 500)."""
    from ..infer.load import load
    from ..post.rollout import make_engine
    from ..post.tasks import FileTask, get_task
    from ..train.checkpoint import model_dir

    if not (mc_files or gen_files or tasks):
        raise ValueError("nothing to evaluate: pass --mc FILE, --gen FILE and/or --task NAME")
    model, tok = load(model_dir(ckpt), tokenizer, device, dtype)
    results, details = {}, {}
    for path in mc_files:
        items = mc.read_mc(path)[:limit]
        details[path] = []
        results[path] = {"kind": "mc", **mc.evaluate(model, tok, items, delimiter, details=details[path])}
        log(f"{path}: acc {results[path]['acc']:.4f}, acc_norm {results[path]['acc_norm']:.4f}")
    benches = [(p, FileTask(p, answer_pattern)) for p in gen_files] + [(t, get_task(t, answer_pattern)) for t in tasks]
    for name, task in benches:
        problems = task.all[:limit] if name in gen_files else task.problems("test", limit or 500)
        longest = max(len(p) for p in gen.prompts_of(tok, task, problems, style))
        engine = make_engine(model, tok, max_batch=min(256, len(problems) * k), max_len=longest + max_new_tokens)
        details[name] = []
        results[name] = {"kind": "gen", **gen.evaluate(engine, task, problems, style, k, temperature, max_new_tokens,
                                                        seed, samples=details[name])}
        log(f"{name}: exact match {results[name]['exact_match']:.4f}")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"ckpt": ckpt, "results": results, "details": details}, f, indent=1)
    return results
