"""The utility benchmark's splits: the rows it scores are rows no site trained on, each
PubMedQA row is held out in exactly one fold, and the shared files are read as JSON Lines
even where an abstract holds a Unicode line separator. (The benchmark itself is a script:
benchmarks/utility.py.)"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from benchmarks import utility


@pytest.fixture
def shared(tmp_path, monkeypatch):
    monkeypatch.setattr(utility, "SHARED", tmp_path)
    return tmp_path


def _jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # ensure_ascii=False writes U+2028 raw, as the shared PubMedQA file has it
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_rows_with_unicode_line_separators_are_read_whole(shared):
    rows = [{"id": i, "context": f"first\u2028second\u0085third {i}"} for i in range(3)]
    _jsonl(shared / "rows.jsonl", rows)
    assert utility._read(shared / "rows.jsonl") == rows


def test_pubmedqa_folds_hold_out_each_row_once_and_never_train_on_it(shared, tmp_path):
    rows = [{"id": i, "question": f"q{i}\u2028?", "label": "yes no maybe".split()[i % 3]} for i in range(23)]
    _jsonl(shared / "pubmedqa" / "train.jsonl", rows)
    out = tmp_path / "out"
    out.mkdir()
    folds = utility.pubmedqa_folds(out, 5, 5, 0)
    held_ids = Counter()
    for train, held in folds:
        t = {r["id"] for r in utility._read(train)}
        h = {r["id"] for r in utility._read(held)}
        assert not t & h and len(t | h) == 23
        held_ids.update(h)
    assert sorted(held_ids) == list(range(23)) and set(held_ids.values()) == {1}
    assert len(utility.pubmedqa_folds(out, 5, 2, 0)) == 2  # --folds 2: the first two


def test_banking77_held_out_rows_are_stratified_and_unseen(shared, tmp_path):
    rows = [{"text": f"t{i}", "label": f"intent{i % 4}", "group": "g"} for i in range(40)]
    _jsonl(shared / "banking77" / "train.jsonl", rows)
    out = tmp_path / "out"
    out.mkdir()
    [(train, held)] = utility.banking77_split(out, per_label=3)
    t, h = utility._read(train), utility._read(held)
    assert Counter(r["label"] for r in h) == {f"intent{k}": 3 for k in range(4)}
    assert not {r["text"] for r in t} & {r["text"] for r in h} and len(t) + len(h) == 40


def test_the_site_alone_rows_run_on_their_own(shared, tmp_path, monkeypatch):
    """`--skip central federated` runs only the site-alone rows: each site's own rows are
    written beside the fold and trained alone, and the rows fold into one mean row (the
    training and the scoring are stubbed: this checks the benchmark's own plumbing)."""
    import argparse

    import fedslm.model

    rows = [{"question": f"q{i}", "context": "c", "long_answer": "a", "label": "yes no maybe".split()[i % 3]}
            for i in range(30)]
    train = tmp_path / "train.jsonl"
    _jsonl(train, rows)
    trained = []

    def federate(name, overrides, out):
        path = [o.split("=", 1)[1] for o in overrides if o.startswith("data.path=")][-1]  # Hydra: the last wins
        trained.append((name, len(utility._read(utility.Path(path)))))
        return {"epsilon": 8.0, "wall_seconds": 1.0, "model_dir": out / name}

    monkeypatch.setattr(utility, "federate", federate)
    monkeypatch.setattr(utility, "score", lambda model_dir, cfg, gen: {"accuracy": 0.5, "macro_f1": 0.4, "held_out": 3})
    monkeypatch.setattr(fedslm.model, "resolve_model_dir", lambda cfg: tmp_path / "base")
    args = argparse.Namespace(recipe=[], per_site=0, gen_rows=0, skip=["central", "federated"], epsilons=[8.0],
                              alone_sites=99)
    out = utility.one_split("pubmedqa", train, train, args, tmp_path / "fold0")  # the fold's directory is not there
    assert [name for name, _ in trained] == ["alone-0", "alone-1", "alone-2"]
    assert sum(n for _, n in trained) == 30  # every row in exactly one site's file
    assert [r["row"] for r in out] == ["base model", "each site alone, DP epsilon 8 (mean of 3)"]
    assert len(out[1]["per_site"]) == 3
