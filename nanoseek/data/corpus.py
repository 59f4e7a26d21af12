"""The embedded default corpus: short English documents about a small, consistent synthetic world, generated
deterministically from a seed (no download). Licence: generated text, part of nanoseek, MIT.

What a few-million-parameter model can visibly learn from it in minutes: the grammar of the templates, the
world's fixed facts (who lives where, whose pet is what), counting sequences, and small sums.
"""
from __future__ import annotations

import random

NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Lily", "Noah", "Emma", "Finn", "Ruby", "Owen",
         "Nora", "Jack", "Ella", "Luca", "Iris", "Ben", "Lucy", "Adam", "Rosa", "Hugo"]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Dublin", "Quito"]
PETS = ["cat", "dog", "parrot", "rabbit", "turtle", "horse"]
PET_NAMES = ["Pip", "Rex", "Coco", "Milo", "Luna", "Bo", "Kiki", "Ziggy"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
THINGS = ["apples", "books", "coins", "shells", "pencils", "stamps"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]


def world(seed: int = 0) -> dict[str, dict[str, str]]:
    """Each person's fixed facts; the same seed gives the same world in every document."""
    rng = random.Random(seed)
    return {n: {"city": rng.choice(CITIES), "pet": rng.choice(PETS), "pet_name": rng.choice(PET_NAMES),
                "color": rng.choice(COLORS)} for n in NAMES}


def _story(rng, w):
    a, b = rng.sample(NAMES, 2)
    n = rng.randint(2, 9)
    k = rng.randint(1, n - 1)
    thing = rng.choice(THINGS)
    return f"{a} has {n} {thing}. {a} gives {k} to {b}. Now {a} has {n - k} {thing}."


def _facts(rng, w):
    a = rng.choice(NAMES)
    f = w[a]
    parts = [f"{a} lives in {f['city']}.", f"{a} has a {f['pet']} named {f['pet_name']}.",
             f"The favorite color of {a} is {f['color']}."]
    rng.shuffle(parts)
    return " ".join(parts[: rng.randint(1, 3)])


def _question(rng, w):
    a = rng.choice(NAMES)
    f = w[a]
    return rng.choice([f"Q: Where does {a} live? A: {a} lives in {f['city']}.",
                       f"Q: What pet does {a} have? A: {a} has a {f['pet']}.",
                       f"Q: What is the name of the {f['pet']} of {a}? A: Its name is {f['pet_name']}."])


def _sum(rng, w):
    x, y = rng.randint(0, 20), rng.randint(0, 20)
    return f"{x} + {y} = {x + y}."


def _count(rng, w):
    start = rng.randint(0, 5)
    return ", ".join(NUMBER_WORDS[start: start + rng.randint(4, 8)]) + "."


SEGMENTS = [_story, _facts, _question, _sum, _count]


def default_corpus(seed: int = 0, n_docs: int = 12000) -> list[str]:
    """n_docs documents of 3–7 sentences each (~3 MB at the default size)."""
    w = world(seed)
    rng = random.Random(seed + 1)
    return [" ".join(rng.choice(SEGMENTS)(rng, w) for _ in range(rng.randint(3, 7))) for _ in range(n_docs)]


def default_prompts(seed: int = 0) -> list[str]:
    """Prompts whose continuations show what was learned: arithmetic in a story, a memorized fact, a sum, counting."""
    a, b = NAMES[0], NAMES[1]
    return [f"{a} has 7 apples. {a} gives 3 to {b}. Now {a} has",
            f"Q: Where does {b} live? A:",
            "4 + 5 =",
            "two, three, four,"]
