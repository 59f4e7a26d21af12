"""Rule-based rewards on hand-written completions (good, malformed, wrong, hidden and injected answers), the safe
math parser, and the built-in tasks (disjoint splits, worked solutions that their own checker accepts)."""
import time

import pytest

from nanoseek.post.expr import ParseError, equivalent, parse
from nanoseek.post.rewards import extract_answer, format_ok, normalize, score, split_think
from nanoseek.post.tasks import Countdown, FileTask, Problem, get_task

ADD = get_task("addition")
P = Problem("What is 347 + 589?", "936", "347+589", (347, 589))


def reward(text, task=ADD, problem=P):
    r = score(text, task, problem, format_weight=0.1)
    return r.accuracy, r.format


@pytest.mark.parametrize("text, acc, fmt", [
    # well formed and right
    ("<think>7 + 9 = 16. 4 + 8 + 1 = 13. 3 + 5 + 1 = 9.</think> \\boxed{936}", 1, 1),
    ("  <think>carry</think>The answer is $\\boxed{ 936 }$.", 1, 1),
    ("<think>x</think> \\boxed{936.0}", 1, 1),                         # same number
    ("<think>x</think> \\boxed{936} and again \\boxed{936}", 1, 1),    # repeated, consistent
    # well formed, wrong or missing answer
    ("<think>7 + 9 = 16.</think> \\boxed{937}", 0, 1),
    ("<think>7 + 9 = 16.</think> 936", 0, 1),                          # no \boxed{}, and the task has no pattern
    ("<think>x</think> \\boxed{936", 0, 1),                             # unclosed box
    # answer hidden in the reasoning, or a fake \boxed{} planted there: never counts
    ("<think>so it is \\boxed{936}</think> \\boxed{935}", 0, 1),
    ("<think>\\boxed{936}</think> I am not sure.", 0, 1),
    # hedging: several different boxed answers
    ("<think>x</think> \\boxed{935} or \\boxed{936}", 0, 1),
    # malformed tags: no answer at all, whatever follows
    ("<think>x</think></think> \\boxed{936}", 0, 0),                  # second close
    ("<think><think>x</think> \\boxed{936}", 0, 0),                    # second open
    ("</think> \\boxed{936}", 0, 0),                                   # close without open
    ("<think>x \\boxed{936}", 0, 0),                                   # never closed
    ("answer: <think>x</think> \\boxed{936}", 0, 0),                   # text before <think>
    ("<think>a</think> \\boxed{1}<think>b</think> \\boxed{936}", 0, 0),  # a second think block to hide in
    # empty reasoning or empty answer region: no format reward
    ("<think></think> \\boxed{936}", 1, 0),
    ("<think>x</think>", 0, 0),
    # no think tags at all (V3's plain responses): read whole, no format reward
    ("\\boxed{936}", 1, 0),
    ("The sum is 936.", 0, 0),
])
def test_rewards_hand_written(text, acc, fmt):
    assert reward(text) == (acc, fmt)


def test_reward_total_and_split():
    r = score("<think>x</think> \\boxed{936}", ADD, P, format_weight=0.25)
    assert (r.accuracy, r.format, r.total) == (1.0, 1.0, 1.25)
    assert split_think("<think>a</think>b") == ("a", "b")
    assert split_think("plain") == (None, "plain")
    assert split_think("<think>a") is None
    assert format_ok("<think>a</think> b") and not format_ok("a b")


def test_answer_pattern_fallback():
    # a task's own answer format applies only after </think> and only when there is no \boxed{}
    pattern = r"####\s*(\S+)"
    assert extract_answer("<think>#### 5</think> #### 7", pattern) == "7"
    assert extract_answer("<think>#### 5</think> nothing", pattern) is None
    assert extract_answer("<think>x</think> \\boxed{3} #### 7", pattern) == "3"
    task = FileTask.__new__(FileTask)
    task.answer_pattern = pattern
    assert score("<think>x</think> #### 936", task, P).accuracy == 1


def test_normalize():
    assert normalize(" $\\text{1,234}$. ") == "1234"
    assert normalize("\\left( \\dfrac{1}{2} \\right)") == "( \\frac{1}{2} )"
    assert normalize("Paris") == normalize("paris.")


@pytest.mark.parametrize("a, b, same", [
    ("1/2", "0.5", True), ("\\frac{1}{2}", ".5", True), ("\\frac12", "1/2", True), ("2x+1", "1+x*2", True),
    ("(x+1)^2", "x^2+2x+1", True), ("sqrt(8)", "2\\sqrt{2}", True), ("(1+\\sqrt{2})^2", "3+2\\sqrt2", True),
    ("2\\pi", "\\pi \\cdot 2", True), ("10^-2", "0.01", True), ("3(4)", "12", True), ("-3", "-(3)", True),
    ("936", "937", False), ("x", "y", False), ("x^2", "x", False), ("1 000", "1000", False), ("1/0", "1", False),
])
def test_equivalent(a, b, same):
    assert equivalent(a, b) is same


@pytest.mark.parametrize("text", [
    "__import__('os').system('echo pwned')", "().__class__", "exec('1')", "lambda: 1", "9**9**9**9",
    "((((9^64)^64)^64)^64)", "2^65", "a" * 500, "1" + "+1" * 150,
])
def test_unsafe_or_huge_inputs_are_refused_fast(text):
    t0 = time.perf_counter()
    with pytest.raises(ParseError):
        parse(text)
    assert not equivalent(text, "1")
    assert time.perf_counter() - t0 < 1.0


def test_builtin_tasks_splits_and_solutions():
    for spec in ["addition", "addition:1-4", "arithmetic", "arithmetic:6", "countdown"]:
        task = get_task(spec)
        train, test = task.problems("train", 300, seed=1), task.problems("test", 100)
        assert len({p.key for p in train}) == 300 and len({p.key for p in test}) == 100
        assert not {p.key for p in train} & {p.key for p in task.problems("test", 1000)}
        assert task.problems("test", 100) == test                       # deterministic
        for p in train[:50]:
            for messages in task.sft_samples(p):
                assert task.check(extract_answer(messages[-1]["content"]), p), (spec, messages)
            assert score(f"<think>{task.solution(p)}</think> \\boxed{{{p.answer}}}", task, p).total > 0


def test_countdown_check():
    task = Countdown(3)
    p = Problem("Use 3, 5, 8 to make 23.", "23", "x", (3, 5, 8))
    assert task.check("3 * 5 + 8", p) and task.check("8 + 5*3", p)
    assert not task.check("3 * 5 + 8 + 0", p)         # a number that was not given
    assert not task.check("23", p)                    # the numbers must be used
    assert not task.check("3 * 5 + 7", p)
    assert not task.check("8 * 3 - 1", p)             # 5 unused, 1 not given
    assert not task.check(None, p)


def test_arithmetic_solution_format():
    task = get_task("arithmetic")
    p = Problem("What is 7 + 5 - 3 + 8?", "17", "7 + 5 - 3 + 8", (7, 5, 3, 8))
    assert task.solution(p) == "7 + 5 - 3 + 8 = 12 - 3 + 8 = 9 + 8 = 17."
    assert ADD.solution(P) == "7 + 9 = 16. 4 + 8 + 1 = 13. 3 + 5 + 1 = 9."


def test_file_task(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(f'{{"question": "q{i}", "answer": "{i}"}}\n' for i in range(200)))
    task = get_task(str(path))
    train, test = task.problems("train", 1000), task.problems("test", 1000)
    assert len(train) + len(test) == 200 and not {p.key for p in train} & {p.key for p in test}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="needs 'question' and 'answer'"):
        get_task(str(bad))
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")
