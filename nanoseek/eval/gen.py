"""Generation-based evaluation (the V3 report's GSM8K / MATH style): generate, extract the final answer, check it.

  exact_match   greedy decoding, one completion per problem: the share answered right
  pass@1        k samples per problem at temperature T: the mean over problems of (right samples / k), the R1
                report's pass@1 estimate, which has less variance than one sample per problem
  maj@k         the answer given most often among the k samples (answers that are equal as text or as math
                vote together; ties go to the answer seen first; samples without an answer do not vote),
                checked like any answer
Answers are extracted and checked by the rules of post/rewards.py (the final \\boxed{} after </think>, or the
task's answer pattern) and the task's check (post/tasks.py); a JSONL file of {"question", "answer"} is a task.
"""
from __future__ import annotations

from ..post.rewards import extract_answer, format_ok, same_answer
from ..post.rollout import prompt_ids, sample

PROMPT_STYLES = ("reasoning", "chat", "raw")


def prompts_of(tokenizer, task, problems, style: str = "reasoning") -> list[list[int]]:
    """reasoning: system prompt + question (V3's second SFT kind); chat: the question alone; raw: no template."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "raw":
        return [prompt_ids(tokenizer, p.question) for p in problems]
    return [prompt_ids(tokenizer, task.prompt(p, reasoning=style == "reasoning")) for p in problems]


def majority(answers: list[str | None]) -> str | None:
    """The most voted answer; answers join the first earlier answer they equal (same_answer), so "2" and "2.0"
    vote together."""
    classes: list[list] = []     # [representative, votes], in order of first appearance
    for a in answers:
        if a is None:
            continue
        for c in classes:
            if same_answer(a, c[0]):
                c[1] += 1
                break
        else:
            classes.append([a, 1])
    return max(classes, key=lambda c: c[1])[0] if classes else None


def evaluate(engine, task, problems, style: str = "reasoning", k: int = 1, temperature: float = 0.6,
             max_tokens: int = 128, seed: int = 0, timing=None, samples: list | None = None) -> dict:
    """Scores of `engine`'s model on `problems`; with k > 1 also pass@1 and maj@k over k samples at
    `temperature`. `samples`, if given, receives one record per problem (greedy and sampled completions)."""
    tok = engine.tokenizer
    prompts = prompts_of(tok, task, problems, style)
    greedy = [g[0] for g in sample(engine, prompts, 1, max_tokens, temperature=0.0, timing=timing)]

    def right(completion, problem):
        return task.check(extract_answer(completion.text, task.answer_pattern), problem)

    correct = [right(c, p) for c, p in zip(greedy, problems)]
    n = max(len(problems), 1)
    out = {"n": len(problems), "exact_match": sum(correct) / n,
           "format": sum(format_ok(c.text) for c in greedy) / n,
           "length": sum(len(c.ids) for c in greedy) / n}
    sampled = [[] for _ in problems]
    if k > 1:
        sampled = sample(engine, prompts, k, max_tokens, temperature=temperature, seed=seed, timing=timing)
        pass1, maj = 0.0, 0
        for group, p in zip(sampled, problems):
            pass1 += sum(right(c, p) for c in group) / k
            winner = majority([extract_answer(c.text, task.answer_pattern) for c in group])
            maj += winner is not None and task.check(winner, p)
        out["pass@1"] = pass1 / n
        out[f"maj@{k}"] = maj / n
    if samples is not None:
        for p, g, ok, group in zip(problems, greedy, correct, sampled):
            samples.append({"question": p.question, "answer": p.answer, "greedy": g.text, "correct": ok,
                            **({"samples": [c.text for c in group]} if group else {})})
    return out
