"""Verifiable tasks: problems with a rule-checkable answer, split into train and held-out problems.

Built-in tasks are generated offline from a seed (no download), with a worked solution for SFT:
  addition[:LO-HI]   "What is 347 + 589?" -> 936; numbers of LO..HI digits (default 2-3). The worked solution
                     adds column by column, right to left, in the "7 + 9 = 16." form of the pretraining corpus.
  countdown[:N]      "Use 3, 5, 8 to make 23." -> an expression using each number once (default N = 3, numbers
                     1-10, + - *); any correct expression counts, not only the one the problem was built from.
  FILE.jsonl         one {"question": ..., "answer": ...} per line: your own data, checked by answer equality.
The held-out split is a fixed 10% of the problem space, chosen by a hash of the problem (crc32, not Python's
salted hash()): a held-out problem can never be drawn for training, whatever the seed or the count.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from ..io.jsonl import read_jsonl
from .expr import ParseError, numbers, parse
from .rewards import BOXED, THINK_CLOSE, THINK_OPEN, same_answer

HELD_OUT_PERCENT = 10
SPLITS = ("train", "test")
# the switch between V3's two SFT sample kinds: with it, a reasoning response; without it, the plain answer
REASONING_PROMPT = "Think step by step, then answer in \\boxed{}."


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str                     # the reference (countdown: the target)
    key: str                        # identity: what the held-out hash and de-duplication see
    numbers: tuple[int, ...] = ()   # countdown: the numbers to use


def held_out(key: str) -> bool:
    return zlib.crc32(key.encode()) % 100 < HELD_OUT_PERCENT


def boxed_answer(answer: str) -> str:
    return f"{BOXED}{answer}}}"


class Task:
    name = "task"
    answer_pattern: str | None = None   # where a response without \boxed{} states its answer (a regex)

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """n distinct problems of the split (fewer if the split has fewer), the same for the same arguments."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out, seen, tries = [], set(), 0
        while len(out) < n and tries < 100 * n + 1000:
            tries += 1
            p = self.generate(rng)
            if p.key not in seen and held_out(p.key) == (split == "test"):
                seen.add(p.key)
                out.append(p)
        return out

    def generate(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def check(self, answer: str | None, problem: Problem) -> bool:
        return same_answer(answer, problem.answer)

    def solution(self, problem: Problem) -> str | None:
        """A worked solution (the reasoning inside <think>), or None when the task has none."""
        return None

    # ---- chat messages --------------------------------------------------------------------------------------
    def prompt(self, problem: Problem, reasoning: bool = True) -> list[dict]:
        """The conversation to complete: with the reasoning system prompt (V3's second kind) or without."""
        user = [{"role": "user", "content": problem.question}]
        return ([{"role": "system", "content": REASONING_PROMPT}] if reasoning else []) + user

    def sft_samples(self, problem: Problem) -> list[list[dict]]:
        """V3 §5.1's two SFT samples of one problem: <problem, original response> and <system prompt, problem,
        reasoning response>. The second needs a worked solution."""
        plain = self.prompt(problem, False) + [{"role": "assistant", "content": boxed_answer(problem.answer)}]
        steps = self.solution(problem)
        if steps is None:
            return [plain]
        response = f"{THINK_OPEN}{steps}{THINK_CLOSE} {boxed_answer(problem.answer)}"
        return [plain, self.prompt(problem, True) + [{"role": "assistant", "content": response}]]


class Addition(Task):
    def __init__(self, min_digits: int = 2, max_digits: int = 3):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"addition digits must satisfy 1 <= LO <= HI, got {min_digits}-{max_digits}")
        self.min_digits, self.max_digits = min_digits, max_digits
        self.name = f"addition:{min_digits}-{max_digits}"

    def _number(self, rng):
        d = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)

    def generate(self, rng):
        a, b = self._number(rng), self._number(rng)
        return Problem(f"What is {a} + {b}?", str(a + b), f"{a}+{b}", (a, b))

    def solution(self, problem):
        """Column addition, units first: "7 + 9 = 16. 4 + 8 + 1 = 13. 3 + 5 + 1 = 9." (a missing digit is 0)."""
        a, b = (str(x) for x in problem.numbers)
        width = max(len(a), len(b))
        a, b = a.zfill(width)[::-1], b.zfill(width)[::-1]
        steps, carry = [], 0
        for x, y in zip(a, b):
            s = int(x) + int(y) + carry
            steps.append(f"{x} + {y}{' + 1' if carry else ''} = {s}.")
            carry = s // 10
        return " ".join(steps)


class Arithmetic(Task):
    """Multi-step arithmetic on small numbers: "What is 7 + 5 - 3 + 8?" -> 17. Operands 1..10, every partial
    result within 0..max_partial, so each number is a single token of a small vocabulary; the worked solution
    rewrites the expression one operation at a time: "7 + 5 - 3 + 8 = 12 - 3 + 8 = 9 + 8 = 17"."""

    def __init__(self, terms: int = 4, max_partial: int = 30):
        if not 2 <= terms <= 8:
            raise ValueError(f"arithmetic takes 2 to 8 terms, got {terms}")
        self.terms, self.max_partial = terms, max_partial
        self.name = f"arithmetic:{terms}"

    def generate(self, rng):
        while True:
            nums = [rng.randint(1, 10) for _ in range(self.terms)]
            ops = [rng.choice("+-") for _ in range(self.terms - 1)]
            value, ok = nums[0], True
            for op, x in zip(ops, nums[1:]):
                value = value + x if op == "+" else value - x
                ok &= 0 <= value <= self.max_partial
            if ok:
                expr = " ".join([str(nums[0])] + [f"{op} {x}" for op, x in zip(ops, nums[1:])])
                return Problem(f"What is {expr}?", str(value), expr, tuple(nums))

    def solution(self, problem):
        tokens = problem.key.split()
        steps = [" ".join(tokens)]
        while len(tokens) > 1:
            a, op, b = int(tokens[0]), tokens[1], int(tokens[2])
            tokens = [str(a + b if op == "+" else a - b)] + tokens[3:]
            steps.append(" ".join(tokens))
        return " = ".join(steps) + "."


class Countdown(Task):
    """Reach the target with + - * using each given number exactly once (TinyZero's countdown, smaller)."""

    def __init__(self, n_numbers: int = 3, max_number: int = 10):
        if not 2 <= n_numbers <= 6:
            raise ValueError(f"countdown takes 2 to 6 numbers, got {n_numbers}")
        self.n, self.max_number = n_numbers, max_number
        self.name = f"countdown:{n_numbers}"

    def generate(self, rng):
        nums = [rng.randint(1, self.max_number) for _ in range(self.n)]
        value = self._build(rng, nums)[1]
        listed = ", ".join(map(str, nums))
        return Problem(f"Use {listed} to make {value}.", str(value), f"{sorted(nums)}->{value}", tuple(nums))

    @staticmethod
    def _build(rng, nums):
        """A left-deep expression over nums in order: (text, value, the worked steps)."""
        text, value, steps, low = str(nums[0]), nums[0], [], False   # low: text's top operator is + or -
        for x in nums[1:]:
            op = rng.choice("+-*")
            new = value + x if op == "+" else value - x if op == "-" else value * x
            steps.append(f"{value} {op} {x} = {new}.")
            text = f"({text}) * {x}" if op == "*" and low else f"{text} {op} {x}"
            value, low = new, op != "*"
        return text, value, steps

    def check(self, answer, problem):
        """Right if the answer is an expression using exactly the given numbers, each once, worth the target."""
        if answer is None:
            return False
        try:
            used = sorted(numbers(answer))
            value = parse(answer)
        except ParseError:
            return False
        return used == sorted(problem.numbers) and value == int(problem.answer)

    def worked(self, problem):
        """(expression, steps) reaching the target: the generating expression is not stored, so search for one
        over shuffles of the numbers (seeded by the problem: the same every time)."""
        rng = random.Random(problem.key)
        for _ in range(10_000):
            order = list(problem.numbers)
            rng.shuffle(order)
            text, value, steps = self._build(rng, order)
            if value == int(problem.answer):
                return text, " ".join(steps)
        return None

    def solution(self, problem):
        found = self.worked(problem)
        return found and found[1]

    def sft_samples(self, problem):
        # the reference answer is a target, not a response: both samples answer with an expression
        found = self.worked(problem)
        if found is None:
            return []
        text, steps = found
        plain = self.prompt(problem, False) + [{"role": "assistant", "content": boxed_answer(text)}]
        response = f"{THINK_OPEN}{steps}{THINK_CLOSE} {boxed_answer(text)}"
        return [plain, self.prompt(problem, True) + [{"role": "assistant", "content": response}]]


class FileTask(Task):
    """Problems from a JSONL file of {"question", "answer"}; the held-out split is 10% by hash of the question."""

    def __init__(self, path: str, answer_pattern: str | None = None):
        self.name, self.answer_pattern = path, answer_pattern
        self.all: list[Problem] = []
        for where, row in read_jsonl(path, "task file"):
            if "question" not in row or "answer" not in row:
                raise ValueError(f"{where}: needs 'question' and 'answer'")
            q, a = str(row["question"]), str(row["answer"])
            self.all.append(Problem(q, a, q))
        if not self.all:
            raise ValueError(f"{path}: no problems")

    def problems(self, split, n, seed=0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        pool = [p for p in self.all if held_out(p.key) == (split == "test")]
        if n < len(pool):
            pool = random.Random(f"{split}/{seed}").sample(pool, n)
        return pool


def get_task(spec: str, answer_pattern: str | None = None) -> Task:
    """'addition', 'addition:1-4', 'arithmetic', 'arithmetic:6', 'countdown', 'countdown:4', or a .jsonl path."""
    if spec.endswith(".jsonl"):
        return FileTask(spec, answer_pattern)
    name, _, arg = spec.partition(":")
    try:
        if name == "addition":
            lo, _, hi = (arg or "2-3").partition("-")
            return Addition(int(lo), int(hi or lo))
        if name == "arithmetic":
            return Arithmetic(int(arg or 4))
        if name == "countdown":
            return Countdown(int(arg or 3))
    except ValueError as e:
        raise ValueError(f"task {spec!r}: {e}") from None
    raise ValueError(f"unknown task {spec!r}: use addition[:LO-HI], arithmetic[:N], countdown[:N] or a .jsonl file")
