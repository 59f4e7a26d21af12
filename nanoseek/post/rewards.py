"""Rule-based rewards (R1 §2.2.2): an accuracy reward from the final answer and a format reward for the
reasoning tags, nothing learned, so nothing to hack but the rules themselves.

A reasoning completion is `<think> reasoning </think> answer`. The rules, and the cheat each one stops:
  * The answer is read only after `</think>`: a `\\boxed{}` inside the reasoning (a guess written down along
    the way, or one planted to fool the checker) never counts.
  * The tags must be well formed, exactly one `<think>` first and one `</think>` after it; anything else has
    no answer at all, so stray or repeated tags cannot move the answer region.
  * The answer region must commit to one answer: several `\\boxed{}` with different contents (hedging) count
    as none.
  * A completion with no think tags at all (V3's plain responses) is read whole; it earns no format reward.
The answer is the content of the last `\\boxed{...}` (braces balanced), or, when there is none and the task
states its own answer format, the last match of that regular expression. It is compared to the reference
after normalization (spacing, $…$, \\text{}, thousands separators, a trailing period), then as math (expr.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .expr import equivalent

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
BOXED = "\\boxed{"


def split_think(completion: str) -> tuple[str | None, str] | None:
    """(reasoning, answer region) of a well-formed completion; (None, completion) when it has no think tags at
    all; None when the tags are malformed."""
    opens, closes = completion.count(THINK_OPEN), completion.count(THINK_CLOSE)
    if opens == closes == 0:
        return None, completion
    if opens != 1 or closes != 1 or not completion.lstrip().startswith(THINK_OPEN):
        return None
    reasoning, answer = completion.lstrip()[len(THINK_OPEN):].split(THINK_CLOSE)
    return reasoning, answer


def boxed(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` in text, braces balanced; an unclosed one is dropped."""
    out, start = [], 0
    while (i := text.find(BOXED, start)) >= 0:
        depth, j = 1, i + len(BOXED)
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:
            break
        out.append(text[i + len(BOXED): j - 1])
        start = j
    return out


def normalize(answer: str) -> str:
    """Canonical text of an answer: what two spellings of the same answer have in common."""
    s = answer.strip().rstrip(".").strip()
    s = re.sub(r"^\$+|\$+$", "", s)                             # $936$
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)                 # \text{apples}
    s = re.sub(r"\\(left|right|!|,|;|quad)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", s)              # 1,234 -> 1234
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    return s.lower()


def extract_answer(completion: str, pattern: str | None = None) -> str | None:
    """The normalized final answer of a completion under the rules above, or None."""
    parts = split_think(completion)
    if parts is None:
        return None
    region = parts[1]
    found = {normalize(b) for b in boxed(region)}
    if not found and pattern:
        matches = re.findall(pattern, region)
        found = {normalize(matches[-1] if isinstance(matches[-1], str) else matches[-1][0])} if matches else set()
    if len(found) != 1:
        return None
    answer = found.pop()
    return answer or None


def same_answer(answer: str | None, reference: str) -> bool:
    """Normalized text equal, or equal as math (numbers, simple expressions)."""
    if answer is None:
        return False
    ref = normalize(reference)
    return answer == ref or equivalent(answer, ref)


def format_ok(completion: str) -> bool:
    """R1's format reward: reasoning inside one well-formed <think> … </think>, followed by a non-empty answer."""
    parts = split_think(completion)
    return parts is not None and parts[0] is not None and parts[0].strip() != "" and parts[1].strip() != ""


@dataclass
class Reward:
    accuracy: float     # 1 if the final answer is right
    format: float       # 1 if the think tags are well formed
    total: float        # accuracy + format_weight · format


def score(completion: str, task, problem, format_weight: float = 0.1) -> Reward:
    """The reward of one completion to `problem` of `task` (tasks.py: its answer pattern and its check)."""
    acc = float(task.check(extract_answer(completion, task.answer_pattern), problem))
    fmt = float(format_ok(completion))
    return Reward(acc, fmt, acc + format_weight * fmt)
