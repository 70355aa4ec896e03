"""Regenerate the bundled quickstart data (deterministic; run from anywhere).

    python src/loraforge/assets/quickstart/make_data.py

Writes ``qa_{train,eval}.jsonl`` (prompt/completion) and ``chat_{train,eval}.jsonl`` (the same
examples as chat ``messages``). Every sentence comes from the templates below.
"""

import json
import random
from pathlib import Path

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
COLOURS = {
    ("blue", "yellow"): "green",
    ("red", "yellow"): "orange",
    ("red", "blue"): "purple",
    ("red", "white"): "pink",
    ("black", "white"): "grey",
    ("blue", "white"): "light blue",
}
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
ANIMALS = {
    "cat": "meows",
    "dog": "barks",
    "cow": "moos",
    "duck": "quacks",
    "sheep": "bleats",
    "horse": "neighs",
    "lion": "roars",
    "owl": "hoots",
    "frog": "croaks",
    "bee": "buzzes",
}
WORDS = "cat dog sun tree book lamp road milk fish bird rain star moon door ship".split()


def examples():
    for a in range(13):
        for b in range(13):
            if a + b <= 12:
                yield f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    for n in range(13):
        yield f"Write the number {n} in words.", f"The number {n} is written {NUMBER_WORDS[n]}."
    for (x, y), z in COLOURS.items():
        yield f"What colour do you get by mixing {x} and {y}?", f"Mixing {x} and {y} gives {z}."
        yield f"What colour do you get by mixing {y} and {x}?", f"Mixing {y} and {x} gives {z}."
    for i, day in enumerate(DAYS):
        yield f"What day comes after {day}?", f"The day after {day} is {DAYS[(i + 1) % 7]}."
    for i, month in enumerate(MONTHS):
        yield f"What month comes after {month}?", f"The month after {month} is {MONTHS[(i + 1) % 12]}."
    for animal, sound in ANIMALS.items():
        yield f"What sound does a {animal} make?", f"A {animal} {sound}."
    for word in WORDS:
        yield f"Spell the word {word} backwards.", f"The word {word} backwards is {word[::-1]}."
        yield f"How many letters are in the word {word}?", f"The word {word} has {len(word)} letters."


def main():
    here = Path(__file__).parent
    rows = list(examples())
    random.Random(1234).shuffle(rows)
    splits = {"train": rows[:-40], "eval": rows[-40:]}
    system = "You are a helpful assistant. Answer in one short sentence."
    for split, part in splits.items():
        with open(here / f"qa_{split}.jsonl", "w", encoding="utf-8") as f:
            for prompt, completion in part:
                f.write(json.dumps({"prompt": prompt + "\n", "completion": completion}) + "\n")
        with open(here / f"chat_{split}.jsonl", "w", encoding="utf-8") as f:
            for prompt, completion in part:
                messages = [
                    {"role": "system", "content": system},
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": completion},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
    print({k: len(v) for k, v in splits.items()})


if __name__ == "__main__":
    main()
