"""The synthetic clinic data and the answer-only loss mask."""

from __future__ import annotations

from collections import Counter

import pytest

from fedslm.data.clinic import generate_site, site_splits
from fedslm.data.tokenize import TokenizedDataset, encode, make_collate
from fedslm.model import load_base_model, resolve_model_dir


@pytest.fixture
def tok(tiny_cfg):
    return load_base_model(resolve_model_dir(tiny_cfg.model))[1]


def test_generation_is_deterministic_and_seeded():
    assert generate_site(1, 20, seed=3) == generate_site(1, 20, seed=3)
    assert generate_site(1, 20, seed=3) != generate_site(1, 20, seed=4)


def test_sites_are_non_iid():
    mixes = [Counter(r["topic"] for r in generate_site(s, 300, 0)) for s in range(3)]
    # every clinic has topics the others rarely or never see
    for i, mix in enumerate(mixes):
        top = mix.most_common(1)[0][0]
        assert all(other[top] < mix[top] / 2 for j, other in enumerate(mixes) if j != i)
    styles = {generate_site(s, 1, 0)[0]["answer"].split()[0] for s in range(3)}
    assert len(styles) == 3  # each clinic answers in its own voice


def test_eval_split_is_held_out():
    train, held = site_splits(0, 100, 10, 0)
    assert len(train) == 100 and len(held) == 10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_loss_mask_covers_exactly_the_answer_and_eos(tok):
    rec = {"prompt": "Is this the flu?", "answer": "Likely the flu. Rest."}
    enc = encode(tok, rec, max_length=1024)
    answer_ids = [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert answer_ids[-1] == tok.eos_token_id
    assert tok.decode(answer_ids[:-1]) == rec["answer"]
    prompt_ids = [t for t, m in zip(enc.input_ids, enc.loss_mask) if not m]
    assert "Is this the flu?" in tok.decode(prompt_ids)
    assert "Likely" not in tok.decode(prompt_ids)
    # the mask is one contiguous block at the end
    first = enc.loss_mask.index(1)
    assert all(enc.loss_mask[first:]) and not any(enc.loss_mask[:first])


def test_truncation_is_counted_and_empty_answers_dropped(tok):
    recs = [{"prompt": "x" * 50, "answer": "y" * 50}, {"prompt": "x" * 500, "answer": "y"}]
    prompt_len = encode(tok, recs[0], 10_000).loss_mask.count(0)
    ds = TokenizedDataset.from_records(tok, recs, max_length=prompt_len + 10)
    assert ds.truncated == 2 and ds.dropped == 1 and len(ds) == 1
    ids, mask = ds[0]
    assert len(ids) == prompt_len + 10 and mask.sum() == 10


def test_collate_pads_and_masks(tok):
    ds = TokenizedDataset.from_records(tok, generate_site(0, 3, 0), max_length=1024)
    batch = make_collate(tok.pad_token_id)([ds[0], ds[1], ds[2]])
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == lengths.max()
    assert (batch["loss_mask"] <= batch["attention_mask"]).all()  # padding never counts
