"""Writes ``sentiment.jsonl``: a small synthetic sentiment task for ``examples/finetune.py``
(no downloads). Run once; the file is committed, and running it again reproduces it exactly.

Each line is ``{"text": ..., "label": 0 | 1, "split": "train" | "test"}``. A sentence says how
something was, with a positive or negative adjective, optionally intensified and optionally
negated ("not" flips the label); a quarter of the sentences have a second clause after "but",
which decides the label. So the label depends on word order and on negation, not on a bag of
words: a model has to attend to the right words.
"""

from __future__ import annotations

import json
import os
import random

SUBJECTS = ["the movie", "this phone", "the food", "our hotel", "the service", "the book", "this laptop",
            "the concert", "the coffee", "the game", "the staff", "the room", "the show", "this car"]
VERBS = ["was", "is", "seemed", "felt", "looked"]
INTENSIFIERS = ["", "", "really", "very", "quite", "truly", "so"]
POSITIVE = ["good", "great", "excellent", "wonderful", "amazing", "lovely", "fantastic", "pleasant", "brilliant",
            "superb"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "horrible", "poor", "dreadful", "disappointing", "mediocre",
            "nasty"]
TAILS = ["", "", "overall", "to be honest", "in my opinion", "this time", "as usual"]
COUNT = {"train": 480, "test": 160}


def clause(rng: random.Random, negation_rate: float = 0.35) -> tuple[str, int]:
    positive = rng.random() < 0.5
    negated = rng.random() < negation_rate
    words = [rng.choice(SUBJECTS), rng.choice(VERBS)]
    if negated:
        words.append("not")
    words += [rng.choice(INTENSIFIERS), rng.choice(POSITIVE if positive else NEGATIVE)]
    return " ".join(w for w in words if w), int(positive != negated)


def sentence(rng: random.Random) -> tuple[str, int]:
    text, label = clause(rng)
    if rng.random() < 0.25:
        second, second_label = clause(rng)
        while second_label == label:  # "but" joins opposite clauses; the second one counts
            second, second_label = clause(rng)
        text, label = f"{text} but {second}", second_label
    tail = rng.choice(TAILS)
    return (f"{text} {tail}" if tail else text), label


def simple_sentence(rng: random.Random) -> tuple[str, int]:
    """A sentence without negation or contrast: its label is its adjective's polarity (the
    "pretraining" task of finetune.py's built-in base model)."""
    text, label = clause(rng, negation_rate=0.0)
    tail = rng.choice(TAILS)
    return (f"{text} {tail}" if tail else text), label


def dataset() -> list[dict]:
    """The dataset's rows, distinct sentences, in file order."""
    rng = random.Random(20240917)
    seen, rows = set(), []
    for split, count in COUNT.items():
        made = 0
        while made < count:
            text, label = sentence(rng)
            if text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": label, "split": split})
            made += 1
    return rows


def main() -> None:
    rows = dataset()
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sentiment.jsonl")
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
    main()
