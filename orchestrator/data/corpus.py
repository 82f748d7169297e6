"""A small synthetic corpus for demos and tests, generated offline and deterministically.

Each person has four facts (city, job, pet, colour). The pre-training text states them many
times in varied templates; the fine-tuning files ask about them. ``qa_val.jsonl`` holds one
question per person that ``qa_train.jsonl`` never asks, so answering it needs the facts the
model learned during pre-training, not the fine-tuning examples.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Person", "make_people", "write_demo_corpus", "QUESTIONS"]

FIRST = (
    "Alice Bob Carol David Emma Felix Grace Henry Iris Jack Karen Liam Maya Noah Olivia Peter "
    "Quinn Rosa Sam Tara Umar Vera Walter Xena Yusuf Zoe Aaron Bella Caleb Dora Ethan Fiona "
    "George Hannah Isaac Julia Kevin Laura Marco Nina"
).split()
LAST = (
    "Smith Jones Brown Moreau Rossi Novak Silva Kim Chen Patel Garcia Muller Larsen Dubois "
    "Costa Ivanova Tanaka Okafor Nilsson Weber Haddad Kowalski Fischer Romero Berg"
).split()
CITIES = (
    "Paris London Berlin Madrid Rome Vienna Prague Lisbon Dublin Oslo Athens Warsaw Tokyo Lima "
    "Cairo Nairobi Toronto Boston Denver Sydney Seoul Mumbai Hanoi Quito"
).split()
JOBS = (
    "baker doctor teacher pilot farmer painter nurse lawyer chef engineer writer plumber "
    "dentist singer tailor gardener librarian carpenter"
).split()
ANIMALS = "cat dog rabbit parrot horse goat hamster turtle goldfish donkey owl ferret".split()
COLOURS = "red blue green yellow purple orange black white pink grey brown silver".split()

FACT_SENTENCES = {
    "city": ("{n} lives in {v}.", "{n} has a small flat in {v}.", "Every morning {n} walks through {v}.", "The home of {n} is in {v}."),
    "job": ("{n} works as a {v}.", "By trade, {n} is a {v}.", "People know {n} as a good {v}.", "{n} has been a {v} for years."),
    "animal": ("{n} has a {v}.", "The pet of {n} is a {v}.", "{n} feeds the {v} every day.", "{n} takes good care of a {v}."),
    "colour": ("{n} likes the colour {v}.", "The favourite colour of {n} is {v}.", "{n} often wears {v}.", "{n} painted the door {v}."),
}
FILLER = (
    "The weather was mild that week.",
    "It was a quiet day.",
    "Later, everyone went home.",
    "The streets were busy in the evening.",
    "Nothing else happened that day.",
    "A light rain fell in the afternoon.",
)
QUESTIONS = {
    "city": ("Where does {n} live?", " {n} lives in {v}."),
    "job": ("What does {n} do for a living?", " {n} works as a {v}."),
    "animal": ("What pet does {n} have?", " {n} has a {v}."),
    "colour": ("What is the favourite colour of {n}?", " The favourite colour of {n} is {v}."),
}
DOCS_PER_PERSON = 10


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    animal: str
    colour: str

    def fact(self, key: str) -> str:
        return getattr(self, key)


def make_people(n_people: int, seed: int = 0) -> list[Person]:
    """``n_people`` people with unique names and random facts, deterministic for ``seed``."""
    if not 1 <= n_people <= len(FIRST) * len(LAST):
        raise ValueError(f"n_people must be in [1, {len(FIRST) * len(LAST)}], got {n_people}")
    rng = random.Random(seed)
    names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], n_people)
    return [
        Person(n, rng.choice(CITIES), rng.choice(JOBS), rng.choice(ANIMALS), rng.choice(COLOURS)) for n in names
    ]


def _person_doc(p: Person, others: list[Person], rng: random.Random, canonical: bool) -> str:
    """A few sentences about ``p``; ``canonical`` uses the exact QA answer sentences."""
    facts = list(FACT_SENTENCES)
    rng.shuffle(facts)
    if canonical:
        sentences = [QUESTIONS[k][1].strip().format(n=p.name, v=p.fact(k)) for k in facts]
    else:
        sentences = [rng.choice(FACT_SENTENCES[k]).format(n=p.name, v=p.fact(k)) for k in facts]
    if rng.random() < 0.5:
        friend = rng.choice(others)
        key = rng.choice(list(FACT_SENTENCES))
        sentences.append(f"{p.name} is a friend of {friend.name}.")
        sentences.append(rng.choice(FACT_SENTENCES[key]).format(n=friend.name, v=friend.fact(key)))
    if rng.random() < 0.5:
        sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(FILLER))
    return " ".join(sentences)


def write_demo_corpus(directory: str | Path, n_people: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write ``pretrain/part-*.txt`` (blank-line separated documents, ~400 KB for 200 people),
    ``qa_train.jsonl`` and ``qa_val.jsonl``; returns
    ``{"pretrain": dir, "qa_train": file, "qa_val": file, "facts": file}``.
    """
    root = Path(directory)
    pre_dir = root / "pretrain"
    pre_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    people = make_people(n_people, seed)

    # The first document of each person states every fact exactly as the QA answer does.
    docs = [_person_doc(p, people, rng, canonical=i == 0) for p in people for i in range(DOCS_PER_PERSON)]
    rng.shuffle(docs)
    n_files = max(1, min(8, len(docs) // 200))
    for i in range(n_files):
        (pre_dir / f"part-{i:03d}.txt").write_text("\n\n".join(docs[i::n_files]) + "\n", encoding="utf-8")

    train, val = [], []
    for p in people:
        held_out = rng.choice(list(QUESTIONS))
        for key, (question, answer) in QUESTIONS.items():
            record = {"prompt": question.format(n=p.name), "response": answer.format(n=p.name, v=p.fact(key))}
            (val if key == held_out else train).append(record)
    rng.shuffle(train)
    paths = {"pretrain": pre_dir, "qa_train": root / "qa_train.jsonl", "qa_val": root / "qa_val.jsonl", "facts": root / "facts.json"}
    for key, records in (("qa_train", train), ("qa_val", val)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    paths["facts"].write_text(json.dumps([p.__dict__ for p in people], indent=1) + "\n", encoding="utf-8")
    return paths
