"""Canaries for auditing privacy (Carlini et al., "The Secret Sharer"; Steinke, Nasr and
Jagielski 2023): random secrets, each put into one site's training data with
probability 1/2. Which ones went in is written only to that site's audit file."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets

SECRET_DIGITS = 6


@dataclass(frozen=True)
class Canary:
    prompt: str
    secret: str
    inserted: bool

    def answer(self, secret: str | None = None) -> str:
        return f"The access code is {secret or self.secret}."


def make_canaries(count: int, seed: int) -> list[Canary]:
    rng = random.Random(f"canaries|{seed}")
    return [
        Canary(prompt=f"What is the access code of record {rng.randrange(10**7):07d}?",
               secret=random_secret(rng), inserted=rng.random() < 0.5)
        for _ in range(count)
    ]


def random_secret(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(SECRET_DIGITS))


def canary_examples(canaries: list[Canary], columns: list[str], repeats: int = 1) -> datasets.Dataset:
    """The inserted canaries in the shape of the site's examples table."""
    rows = []
    for c in canaries:
        if not c.inserted:
            continue
        if "messages" in columns:
            row = {"messages": [{"role": "user", "content": c.prompt}, {"role": "assistant", "content": c.answer()}]}
        elif "text" in columns:
            row = {"text": f"{c.prompt} {c.answer()}"}
        else:
            row = {"prompt": c.prompt, "answer": c.answer()}
        rows += [row] * repeats
    return datasets.Dataset.from_list(rows)


def write_audit_file(path: Path, site: int, canaries: list[Canary], repeats: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"site": site, "repeats": repeats, "canaries": [asdict(c) for c in canaries]}, indent=1))


def read_audit_file(path: Path) -> tuple[int, list[Canary]]:
    data = json.loads(Path(path).read_text())
    return int(data["site"]), [Canary(**c) for c in data["canaries"]]
