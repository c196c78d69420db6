"""Writes the demo task's data: data/demo/train.jsonl and data/demo/val.jsonl (chat `messages` JSONL).

The task: read one English sentence about a person (the user turn; the system turn states the
task) and answer with a compact JSON object
{"name": ..., "age": ..., "city": ..., "job": ...}, where "city" is where the person lives now
(some sentences also name a home town, as a distractor). Sentences come from 24 phrasings.
The records are a pure function of the seed. The two splits share phrasings and jobs but no
first name, surname or city, so a held-out answer can never be copied from a training one.

The preference version of the same records (train_pairs.jsonl, val_pairs.jsonl: TRL's conversational
{"prompt", "chosen", "rejected"} form, for the DPO demo) keeps each record's answer as `chosen` and makes
`rejected` the kind of wrong answer the SFT demo's adapter gives: a job named after the work the sentence
describes ("defender" for one who defends clients in court; JOB_GUESSES), or the home town as the city.
Run: python data/demo/make.py [--out data/demo] [--seed 0] [--train 1200] [--val 200]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random

# The system prompt states the task and the answer's keys in full, so the base model is asked fairly.
INSTRUCTION = "Extract facts about the person as JSON only, with keys name, age, city (where they live now), job."

FIRST = (
    "Maria Ahmed Lena Tomas Aiko Pablo Ingrid Kofi Sofia Ravi Elena Jonas Amara Diego Yuki Hannah "
    "Mateo Chloe Omar Freya Luca Nadia Felix Zara Ivan Leila Hugo Mei Oscar Priya Emil Rosa Tariq Clara "
    "Kenji Alma Bruno Dalia Anton Ines Samuel Vera Rafael Noor Milan Eva Caleb Ayla Stefan Lucia Idris Greta "
    "Nikolai Paula Bilal Jana Marco Selma Viktor Carmen"
).split()
LAST = (
    "Okafor Lindqvist Moreau Tanaka Novak Haddad Castillo Petrov Mensah Rossi Nakamura Schmidt Dubois "
    "Kowalski Fernandes Larsen Yilmaz Costa Bauer Ivanova Silva Jensen Horvat Romero Fischer Sato Nieminen "
    "Gallo Kader Varga Brennan Alvarez Weber Santos Lund Marin Kaya Hoffman Duarte Olsen Reyes Wagner Berg "
    "Ortiz Keller Moretti Popescu Strand"
).split()
CITIES = (
    "Lisbon Oslo Nairobi Lyon Osaka Denver Porto Krakow Accra Seville Dublin Hanoi Bergen Quito Tunis "
    "Leeds Vienna Cusco Tallinn Perth Bologna Izmir Graz Malmo Rabat Austin Zagreb Tbilisi Lima Ghent "
    "Bremen Kyoto Turin Riga Varna Cork Bilbao Chennai Tampere Valencia"
).split()
# job, a clause "is a/an <job>" can't always say: the verb phrase for phrasings that describe the work
JOBS = {
    "nurse": "cares for patients at a hospital",
    "teacher": "teaches at a primary school",
    "baker": "bakes bread every morning",
    "pilot": "flies planes for an airline",
    "architect": "designs houses",
    "plumber": "fixes pipes and drains",
    "chef": "cooks in a restaurant kitchen",
    "journalist": "writes for a newspaper",
    "electrician": "wires new buildings",
    "dentist": "treats teeth",
    "librarian": "runs the town library",
    "carpenter": "builds furniture from wood",
    "pharmacist": "works behind the counter of a pharmacy",
    "farmer": "grows wheat and keeps goats",
    "mechanic": "repairs cars in a garage",
    "translator": "translates books into English",
    "photographer": "takes photos for magazines",
    "lawyer": "defends clients in court",
    "gardener": "looks after a public park",
    "accountant": "keeps the books for small firms",
}

# {n} name, {a} age, {c} current city, {h} home town (a distractor), {j} job, {an} "a"/"an", {w} work phrase
TEMPLATES = (
    "{n}, {a}, works as {an} {j} in {c}.",
    "{n} is {an} {j} who lives in {c} and is {a} years old.",
    "Meet {n}: {a} years old, {an} {j}, based in {c}.",
    "In {c} lives {an} {a}-year-old {j} called {n}.",
    "{n} ({a}) {w} in {c}.",
    "At {a}, {n} {w} and lives in {c}.",
    "The {j} {n}, aged {a}, has made {c} home.",
    "{n} grew up in {h}, but the {a}-year-old {j} now lives in {c}.",
    "Originally from {h}, {n} is {an} {j} in {c} and turned {a} this year.",
    "{n}, {an} {j} from {h}, moved to {c} at the age of {a}.",
    "Now living in {c}, {n} ({a}) {w}; {h} is where it all started.",
    "{n} left {h} for {c}, where the {a}-year-old {w}.",
    "Age {a}, job {j}, city {c}: that is {n}.",
    "{c} is home to {n}, {an} {j} aged {a}.",
    "{n} {w}. {n} is {a} and lives in {c}.",
    "Having spent years in {h}, {a}-year-old {n} now {w} in {c}.",
    "Ask anyone in {c} about {n}: the {j} is {a} and well known.",
    "{n} is {a}. {n} lives in {c} and {w}.",
    "Our new neighbour in {c}, {n}, is {an} {a}-year-old {j} born in {h}.",
    "{a} years old and {an} {j}, {n} lives in {c}.",
    "Last spring {n}, {an} {j}, celebrated turning {a} in {c}, the city {n} calls home.",
    "{n} was born in {h}; today the {j} lives in {c}, aged {a}.",
    "A {j} in {c}, {n} is {a} years old.",
    "{n} commutes from {c}, where {n} lives, to {h}, where the {a}-year-old {w}.",
)


def _split(items: list[str], n_val: int) -> tuple[list[str], list[str]]:
    """Train / held-out parts of a pool: a fixed interleave, so neither part is all one kind."""
    val = items[:: max(1, len(items) // n_val)][:n_val]
    return [x for x in items if x not in val], val


def _record(rng: random.Random, first: list[str], last: list[str], cities: list[str]) -> dict:
    name = f"{rng.choice(first)} {rng.choice(last)}"
    age = rng.randint(19, 78)
    city, home = rng.sample(cities, 2)
    job = rng.choice(sorted(JOBS))
    sentence = rng.choice(TEMPLATES).format(
        n=name, a=age, c=city, h=home, j=job, w=JOBS[job], an="an" if job[0] in "aeiou" else "a"
    )
    sentence = sentence[0].upper() + sentence[1:]
    answer = json.dumps({"name": name, "age": age, "city": city, "job": job}, separators=(",", ":"))
    return {
        "messages": [
            {"role": "system", "content": INSTRUCTION},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": answer},
        ]
    }


def make(seed: int = 0, n_train: int = 1200, n_val: int = 200) -> tuple[list[dict], list[dict]]:
    """(train, val) records; the splits have disjoint first names, surnames and cities."""
    first_tr, first_va = _split(FIRST, 12)
    last_tr, last_va = _split(LAST, 10)
    city_tr, city_va = _split(CITIES, 8)
    rng = random.Random(seed)
    train = [_record(rng, first_tr, last_tr, city_tr) for _ in range(n_train)]
    val = [_record(rng, first_va, last_va, city_va) for _ in range(n_val)]
    return train, val


# The job a small model names from the work a sentence describes, instead of the job itself: the SFT demo's
# adapter wrote "defender", "furniture builder", "writer", "engineer", "electrical engineer" and "designer".
JOB_GUESSES = {
    "nurse": "caregiver",
    "teacher": "school worker",
    "baker": "cook",
    "pilot": "flight attendant",
    "architect": "designer",
    "plumber": "engineer",
    "chef": "cook",
    "journalist": "writer",
    "electrician": "electrical engineer",
    "dentist": "doctor",
    "librarian": "library manager",
    "carpenter": "furniture builder",
    "pharmacist": "shop assistant",
    "farmer": "goat keeper",
    "mechanic": "engineer",
    "translator": "writer",
    "photographer": "artist",
    "lawyer": "defender",
    "gardener": "park keeper",
    "accountant": "bookkeeper",
}


def wrong_answer(rng: random.Random, record: dict) -> str:
    """The answer to `record` with the mistake the SFT adapter makes (the module docstring), as compact JSON:
    the job guessed from the work where the sentence does not name it, or the home town where it has one."""
    sentence = record["messages"][1]["content"]
    facts = json.loads(record["messages"][2]["content"])
    home = [c for c in CITIES if c != facts["city"] and c in sentence]
    kinds = (["job"] if facts["job"] not in sentence else []) + (["home"] if home else [])
    if rng.choice(kinds or ["job"]) == "home":
        facts["city"] = home[0]
    else:
        facts["job"] = JOB_GUESSES[facts["job"]]
    return json.dumps(facts, separators=(",", ":"))


def as_pairs(records: list[dict], seed: int) -> list[dict]:
    """Each chat record as a TRL conversational preference record: its answer chosen, a wrong one rejected."""
    rng = random.Random(f"pairs-{seed}")
    return [
        {
            "prompt": r["messages"][:2],
            "chosen": [r["messages"][2]],
            "rejected": [{"role": "assistant", "content": wrong_answer(rng, r)}],
        }
        for r in records
    ]


def write(out: str | pathlib.Path, seed: int = 0, n_train: int = 1200, n_val: int = 200) -> tuple[pathlib.Path, ...]:
    """Write train.jsonl, val.jsonl, train_pairs.jsonl and val_pairs.jsonl under `out`; returns their paths."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = make(seed, n_train, n_val)
    files = {
        "train.jsonl": train,
        "val.jsonl": val,
        "train_pairs.jsonl": as_pairs(train, seed),
        "val_pairs.jsonl": as_pairs(val, seed + 1),
    }
    for name, records in files.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (out / name).write_text(text, encoding="utf-8")
    return tuple(out / name for name in files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=1200)
    p.add_argument("--val", type=int, default=200)
    a = p.parse_args()
    for path in write(a.out, a.seed, a.train, a.val):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
