"""Generate the offline ``unitedllm-synthetic`` instruction dataset (Dolly record format).

Each category is a small task with its own clear, learnable pattern, so that a tiny
model picks them up within a few hundred steps and a client that never saw a
category does measurably worse on it. Records look like Dolly-15k records
(``instruction``, ``context``, ``response``, ``category``), and the same seed always
gives the same records, so every rank of a run generates identical data.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["CATEGORIES", "DATASET_NAME", "generate_records"]

DATASET_NAME = "unitedllm-synthetic"

# Short, distinct words: the tasks below manipulate them, so a small BPE vocabulary
# still covers them and the model can memorise their transformations.
_WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "piano",
    "grape",
    "chair",
    "storm",
    "bread",
    "zebra",
    "candle",
    "forest",
    "rocket",
    "violin",
    "garden",
    "silver",
    "pepper",
    "window",
    "mango",
    "eagle",
    "ocean",
    "tulip",
    "robot",
    "honey",
    "maple",
    "otter",
    "plum",
    "wolf",
)

_NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)

# A fixed made-up "translation" vocabulary: pure memorisation, unguessable without the category.
_GLOSSARY = {
    "sun": "sol",
    "moon": "lun",
    "water": "aqua",
    "fire": "pyro",
    "tree": "arbo",
    "house": "domo",
    "dog": "kano",
    "cat": "felo",
    "bird": "avio",
    "fish": "pisko",
    "book": "libro",
    "road": "vojo",
}

_SEQUENCES = (
    ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
    (
        "january",
        "february",
        "march",
        "april",
        "may",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
    ),
    ("red", "orange", "yellow", "green", "blue", "indigo", "violet"),
    ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m"),
)

Record = dict[str, str]


def _addition(rng: random.Random) -> Record:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"instruction": f"What is {a} plus {b}?", "context": "", "response": str(a + b)}


def _reverse(rng: random.Random) -> Record:
    word = rng.choice(_WORDS)
    return {"instruction": "Reverse the letters of the word.", "context": word, "response": word[::-1]}


def _uppercase(rng: random.Random) -> Record:
    words = rng.sample(_WORDS, 2)
    text = " ".join(words)
    return {"instruction": "Write the text in capital letters.", "context": text, "response": text.upper()}


def _count_letters(rng: random.Random) -> Record:
    word = rng.choice(_WORDS)
    return {
        "instruction": f"How many letters are in the word {word}?",
        "context": "",
        "response": _NUMBER_WORDS[len(word)] if len(word) < len(_NUMBER_WORDS) else str(len(word)),
    }


def _next_item(rng: random.Random) -> Record:
    seq = rng.choice(_SEQUENCES)
    i = rng.randrange(len(seq) - 1)
    return {"instruction": f"What comes after {seq[i]}?", "context": "", "response": seq[i + 1]}


def _translate(rng: random.Random) -> Record:
    word = rng.choice(sorted(_GLOSSARY))
    return {"instruction": f"Translate {word} into Glossa.", "context": "", "response": _GLOSSARY[word]}


CATEGORIES: dict[str, Callable[[random.Random], Record]] = {
    "addition": _addition,
    "reverse": _reverse,
    "uppercase": _uppercase,
    "count_letters": _count_letters,
    "next_item": _next_item,
    "translate": _translate,
}


def generate_records(num_examples: int, *, seed: int = 0) -> list[Record]:
    """``num_examples`` synthetic Dolly-format records, categories in turn, deterministic in ``seed``."""
    rng = random.Random(f"unitedllm-synthetic:{seed}")
    names = list(CATEGORIES)
    records: list[Record] = []
    for i in range(num_examples):
        category = names[i % len(names)]
        record = CATEGORIES[category](rng)
        record["category"] = category
        records.append(record)
    # Interleaved categories would make any prefix "balanced"; shuffle so that splits are random.
    rng.shuffle(records)
    return records
