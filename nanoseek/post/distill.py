"""`nanoseek distill`: distil a teacher into a student by rejection sampling and SFT (R1 §2.4 / V3 §5.1: the
reasoning data for V3 and for the distilled R1 models was sampled from R1 and kept only where it was right).

  1. the teacher samples `samples` responses to each training problem of a task (reasoning prompt, inference
     engine, temperature `temperature`)
  2. rejection: a response is kept only if it finished by itself (not cut at max_new_tokens), its think tags
     are well formed and the rule-based checker accepts its final answer; at most `keep` distinct responses
     per problem
  3. the kept conversations are written to out_dir/distill.jsonl (chat JSONL, reusable with `nanoseek sft`)
  4. the student is fine-tuned on them (sft.py) into out_dir/student, with held-out accuracy on the task
Teacher and student may use different tokenizers: what passes between them is text.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
from dataclasses import dataclass, field

import torch

from ..eval.gen import prompts_of
from ..train.config import knob
from .chat import write_chat_jsonl
from .rewards import format_ok, score
from .rollout import make_engine, sample
from .sft import SFTConfig, sft
from .tasks import get_task


@dataclass
class DistillConfig:
    task: str = knob("arithmetic", "task whose training problems the teacher answers")
    answer_pattern: str | None = knob(None, "regex for the answer when there is no \\boxed{} (JSONL tasks)")
    problems: int = knob(2000, "training problems the teacher answers")
    samples: int = knob(4, "teacher samples per problem")
    keep: int = knob(1, "distinct accepted responses kept per problem")
    temperature: float = knob(0.7, "teacher sampling temperature")
    max_new_tokens: int = knob(256, "longest teacher response (longer ones are rejected)")
    seed: int = knob(0, "seed of the problems and samples")
    sft: SFTConfig = field(default_factory=SFTConfig, metadata={"doc": "fine-tuning of the student"})


def rejection_sample(cfg: DistillConfig, teacher: str, device: str = "auto", log=print):
    """-> (accepted conversations, number of samples drawn)."""
    from ..infer.load import load
    from ..train.checkpoint import model_dir

    task = get_task(cfg.task, cfg.answer_pattern)
    model, tok = load(model_dir(teacher), device=device)
    problems = task.problems("train", cfg.problems, cfg.seed)
    prompts = prompts_of(tok, task, problems)
    engine = make_engine(model, tok, max_batch=min(256, len(prompts) * cfg.samples),
                         max_len=max(map(len, prompts)) + cfg.max_new_tokens)
    groups = sample(engine, prompts, cfg.samples, cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    kept, covered = [], 0
    for p, group in zip(problems, groups):
        good = []
        for c in group:
            if c.finished and format_ok(c.text) and score(c.text, task, p).accuracy == 1 and c.text not in good:
                good.append(c.text)
        kept += [task.prompt(p, reasoning=True) + [{"role": "assistant", "content": t}] for t in good[: cfg.keep]]
        covered += bool(good)
    n = len(problems) * cfg.samples
    log(f"teacher {teacher}: {len(kept)} responses kept of {n} sampled; {covered} of {len(problems)} problems "
        f"answered right at least once")
    del engine, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return kept, n


def distill(cfg: DistillConfig, teacher: str, student: str, out_dir: str, device: str = "auto",
            progress: bool = True, log=print) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    kept, n = rejection_sample(cfg, teacher, device, log)
    if not kept:
        raise ValueError(f"the teacher got no problem right in {n} samples: nothing to distil "
                         f"(more --samples, another --temperature, or a stronger teacher)")
    data = os.path.join(out_dir, "distill.jsonl")
    write_chat_jsonl(data, kept)
    with open(os.path.join(out_dir, "distill.json"), "w") as f:
        json.dump({"teacher": teacher, "sampled": n, "kept": len(kept), "config": dataclasses.asdict(cfg)}, f,
                  indent=2)
    sft_cfg = dataclasses.replace(cfg.sft, data=[data], task=None, eval_task=cfg.task)
    result = sft(sft_cfg, student, os.path.join(out_dir, "student"), device, progress=progress, log=log)
    return {"sampled": n, "kept": len(kept), "data": data, **result}
