"""Site data from files: formats, record shapes, partitioners, and every bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch

from fedslm.config import DataConfig, PrivacyConfig, TrainConfig
from fedslm.data.errors import DataError
from fedslm.data.sites import build_site_data, site_rows, site_table
from fedslm.data.sources import load_table
from fedslm.data.tokenize import encode
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.privacy.plan import check_site_size

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def tok(tiny_cfg):
    return load_base_model(resolve_model_dir(tiny_cfg.model))[1]


ROWS = [
    {"question": f"Question {i}\u2028with a line separator?", "context": f"ctx {i}", "answer": f"Answer {i}.",
     "label": ["yes", "no", "maybe"][i % 3], "source": ["A", "B", "C"][i % 3]}
    for i in range(30)
]


def _cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **{"prompt_columns": ["question"], **kw})


def _write_jsonl(path: Path, rows) -> Path:
    # json.dumps(ensure_ascii=False) leaves U+2028 raw inside the string, as PubMedQA does
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    jsonl = _write_jsonl(tmp_path / "qa.jsonl", ROWS)
    table = datasets.Dataset.from_list(ROWS)
    table.to_csv(str(tmp_path / "qa.csv"), index=False)
    table.to_parquet(str(tmp_path / "qa.parquet"))
    table.save_to_disk(str(tmp_path / "qa_arrow"))
    (tmp_path / "qa.data").write_bytes(jsonl.read_bytes())
    return tmp_path


# --- formats --------------------------------------------------------------------------

@pytest.mark.parametrize("name,fmt", [("qa.jsonl", None), ("qa.csv", None), ("qa.parquet", None),
                                      ("qa_arrow", None), ("qa.data", "jsonl")])
def test_every_format_reads_the_same_rows(files, name, fmt):
    table = load_table(str(files / name), fmt)
    assert len(table) == 30
    assert table[0]["question"] == ROWS[0]["question"]  # U+2028 kept inside the string
    assert sorted(table["answer"]) == sorted(r["answer"] for r in ROWS)


def test_offline_builder_reads_local_files(files):
    table = load_table(str(files / "qa.jsonl"), "json")  # the `json` builder of datasets
    assert len(table) == 30


# --- record shapes and masks ------------------------------------------------------------

def _answer_text(tok, enc):
    return tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m], skip_special_tokens=True)


def test_instruction_with_templates_masks_the_prompt(files, tok):
    cfg = DataConfig(name="t", path=str(files / "qa.jsonl"), prompt_template="{question}\nContext: {context}",
                     answer_template="{label}. {answer}", max_length=1024, eval_fraction=0.2, loss_on="answer")
    data = build_site_data(cfg, 0, 1, tok)
    assert len(data.train) == 24 and len(data.eval) == 6
    ids, mask = data.train[0]
    answers = {f"{r['label']}. {r['answer']}" for r in ROWS}
    assert tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=True) in answers
    prompt = tok.decode(ids[~mask.bool()].tolist())
    assert "Context: ctx" in prompt and "Answer" not in prompt


def test_loss_on_label_answer_all_and_auto(files, tok):
    """data.loss_on: the label that starts the answer alone (auto picks it when the rows
    have a label), the whole answer, or every token; the token sequence is the same
    answer text either way, and an answer that does not start with its label is refused."""
    def first(**kw):
        cfg = DataConfig(name="t", path=str(files / "qa.jsonl"), prompt_template="{question}\nContext: {context}",
                         answer_template="{label}. {answer}", max_length=1024, eval_fraction=0.2, **kw)
        ids, mask = build_site_data(cfg, 0, 1, tok).train[0]
        return ids, mask.bool()

    by = {on: first(loss_on=on) for on in ("label", "auto", "answer", "all")}
    ids, mask = by["label"]
    label = tok.decode(ids[mask].tolist(), skip_special_tokens=True)
    assert label in {"yes", "no", "maybe"}
    assert torch.equal(by["auto"][1], mask) and torch.equal(by["auto"][0], ids)
    answer_ids, answer_mask = by["answer"]
    assert tok.decode(answer_ids[answer_mask].tolist(), skip_special_tokens=True).startswith(label + ". Answer")
    assert answer_mask.sum() > mask.sum() and bool(by["all"][1].all())
    # the label's tokens are the answer's first masked tokens
    assert torch.equal(ids[mask], answer_ids[answer_mask][: int(mask.sum())])

    # auto without a label column: the whole answer
    plain = DataConfig(name="t", path=str(files / "qa.jsonl"), prompt_columns=["question"], answer_column="answer",
                       label_column="no_such_column", max_length=1024, eval_fraction=0.2)
    ids, mask = build_site_data(plain, 0, 1, tok).train[0]
    assert tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=True).startswith("Answer ")
    with pytest.raises(DataError, match="data.loss_on=label"):
        build_site_data(replace(plain, loss_on="label"), 0, 1, tok)
    with pytest.raises(ValueError, match="does not start with its label"):
        encode(tok, {"prompt": "q", "answer": "Because. yes", "label": "yes"}, 256)


def test_chat_shape_masks_every_assistant_turn_only(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there."},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "Goodbye."}]
    enc = encode(tok, {"messages": messages}, 4096)
    assert _answer_text(tok, enc) == "Hello there.Goodbye."
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(enc.input_ids) == full.rstrip("\n")


def test_text_shape_and_packing_never_splits_a_document(tmp_path, tok):
    docs = [{"text": "x" * n} for n in (30, 40, 50, 20, 90)]
    path = _write_jsonl(tmp_path / "t.jsonl", docs)
    cfg = DataConfig(path=str(path), shape="text", max_length=100, packing=True, eval_fraction=0.2, seed=1)
    data = build_site_data(cfg, 0, 1, tok)
    lengths = [len(data.train[i][0]) for i in range(len(data.train))]
    assert all(n <= 100 for n in lengths) and len(lengths) < 4  # 4 docs packed into fewer blocks
    assert sum(lengths) == sum(len(d["text"]) + 1 for d in docs if True) - _eval_tokens(data)
    ids, mask = data.train[0]
    assert bool(mask.all())


def _eval_tokens(data):
    return sum(len(data.eval[i][0]) for i in range(len(data.eval)))


def test_classification_answer_is_the_label(files, tok):
    labels = files / "labels.json"
    labels.write_text(json.dumps(["yes", "no", "maybe"]))
    cfg = DataConfig(path=str(files / "qa.jsonl"), shape="classification", text_column="question",
                     label_column="label", labels_path=str(labels), max_length=1024)
    data = build_site_data(cfg, 0, 1, tok)
    ids, mask = data.train[0]
    assert tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=True) in {"yes", "no", "maybe"}


def test_truncation_is_counted(files, tok):
    cfg = _cfg(files / "qa.jsonl", max_length=64)
    data = build_site_data(cfg, 0, 1, tok)
    assert data.train.truncated + data.train.dropped > 0


# --- partitioners ---------------------------------------------------------------------

def test_iid_partition_sizes_and_determinism(files):
    cfg = _cfg(files / "qa.jsonl", partitioner="iid", eval_fraction=0.2, seed=3)
    sizes = [len(site_rows(cfg, s, 3).train) + len(site_rows(cfg, s, 3).eval) for s in range(3)]
    assert sizes == [10, 10, 10]
    assert site_rows(cfg, 1, 3).train["answer"] == site_rows(cfg, 1, 3).train["answer"]
    other = site_rows(replace(cfg, seed=4), 1, 3).train["answer"]
    assert other != site_rows(cfg, 1, 3).train["answer"]
    all_rows = set()
    for s in range(3):
        r = site_rows(cfg, s, 3)
        all_rows |= set(r.train["answer"]) | set(r.eval["answer"])
    assert len(all_rows) == 30  # a disjoint cover of the data


def test_natural_partition_one_site_per_value(files):
    cfg = _cfg(files / "qa.jsonl", partitioner="natural", partition_by="source", eval_fraction=0.2)
    keys = {site_rows(cfg, s, 3).natural_id for s in range(3)}
    assert keys == {"A", "B", "C"}
    for s in range(3):
        r = site_rows(cfg, s, 3)
        assert set(r.train["source"]) == {r.natural_id}
    with pytest.raises(DataError, match="set federation.sites=3, or data.partitioner=natural_sample"):
        site_rows(cfg, 0, 2)


def test_natural_sample_draws_sites_with_the_seed(files):
    cfg = _cfg(files / "qa.jsonl", partitioner="natural_sample", partition_by="source")
    picked = [site_rows(cfg, s, 2).natural_id for s in range(2)]
    assert len(set(picked)) == 2 and set(picked) <= {"A", "B", "C"}
    assert picked == [site_rows(cfg, s, 2).natural_id for s in range(2)]


def test_dirichlet_partition_covers_the_data_and_skews_labels(tmp_path):
    rows = [{"text": f"t{i}", "label": f"l{i % 4}", "answer": "a"} for i in range(400)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(path=str(path), prompt_columns=["text"], partitioner="dirichlet", partition_by="label",
                     alpha=0.3, seed=0, eval_fraction=0.1)
    sites = [site_rows(cfg, s, 4) for s in range(4)]
    assert sum(len(r.train) + len(r.eval) for r in sites) == 400
    shares = [max(r.train["label"].count(f"l{k}") for k in range(4)) / len(r.train) for r in sites]
    assert max(shares) > 0.4  # label skew: some site is dominated by one label
    again = site_rows(cfg, 2, 4)
    assert again.train["text"] == sites[2].train["text"]


def test_max_examples_caps_train_and_eval_in_proportion(files):
    cfg = _cfg(files / "qa.jsonl", max_examples=9, eval_fraction=0.25)
    rows = site_rows(cfg, 0, 1)
    assert len(rows.train) == 9 and len(rows.eval) == 3


def test_site_table_reports_sizes_and_mix(files):
    cfg = _cfg(files / "qa.jsonl", partitioner="natural", partition_by="source")
    table = site_table(cfg, 3)
    assert [r["train"] + r["eval"] for r in table] == [10, 10, 10]
    assert all(r["label_mix"] for r in table)


def test_a_deployed_sites_data_settings_are_its_own_and_use_the_whole_file(files):
    """The run's data settings (its path, columns, held-out fraction) never reach a
    deployed site; its node config and policy file name its data."""
    from fedslm.site.policy import PolicyError, SitePolicy, site_data_config

    run_cfg = DataConfig(path="/coordinator/choice.jsonl", prompt_columns=["secret"], eval_fraction=0.9, max_length=300)
    policy = SitePolicy.from_node_config({"site-id": 4, "data-path": str(files / "qa.csv")})
    cfg = site_data_config(run_cfg, policy.data | {"prompt_columns": ["question"]})
    assert cfg.path.endswith("qa.csv") and cfg.prompt_columns == ["question"]
    assert cfg.eval_fraction == DataConfig().eval_fraction and cfg.max_length == 300
    rows = site_rows(cfg, 4, 1, own_data=True)
    assert len(rows.train) + len(rows.eval) == 30
    with pytest.raises(PolicyError, match="names no data of its own"):
        site_data_config(run_cfg, SitePolicy.from_node_config({"data-format": "csv"}).data)


# --- bad input: one message naming the problem and the fix ----------------------------

def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"does not exist; check data.path"):
        load_table(str(tmp_path / "nope.jsonl"))


def test_corrupt_json_line_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", ROWS[:5])
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[3] = '{"question": "broken", "answer": '
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: line 4 is not valid JSON"):
        load_table(str(path))


def test_unreadable_file(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=r"cannot read .*x.parquet as parquet"):
        load_table(str(path))


def test_unknown_extension_asks_for_format(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="set data.format"):
        load_table(str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("question,answer\n")
    with pytest.raises(DataError, match="has no rows"):
        load_table(str(path))


def test_missing_column_lists_the_columns_found(files):
    cfg = DataConfig(path=str(files / "qa.jsonl"), prompt_columns=["prompt"], answer_column="answer")
    with pytest.raises(DataError, match=r"'prompt' not found; the data has columns question, context, answer"):
        site_rows(cfg, 0, 1)


def test_labels_outside_the_label_set(files, tok):
    labels = files / "labels.json"
    labels.write_text(json.dumps(["yes", "no"]))
    cfg = DataConfig(path=str(files / "qa.jsonl"), shape="classification", text_column="question",
                     labels_path=str(labels))
    with pytest.raises(DataError, match=r"not in the label set .* \(maybe\)"):
        build_site_data(cfg, 0, 1, tok)


def test_split_smaller_than_the_dp_batch():
    with pytest.raises(DataError, match="site 2 has 5 training examples, fewer than train.batch_size=8"):
        check_site_size(PrivacyConfig(), TrainConfig(batch_size=8), 5, rounds=3, site=2)


def test_split_too_small_for_the_privacy_target_says_how_many_are_needed():
    privacy, train = PrivacyConfig(epsilon=0.5, max_noise_multiplier=2.0), TrainConfig(batch_size=8, local_steps=10)
    with pytest.raises(DataError, match=r"too few for epsilon 0.5 .* needs about (\d+) examples") as err:
        check_site_size(privacy, train, 40, rounds=5, site=1)
    needed = int(err.value.args[0].split("needs about ")[1].split()[0])
    assert needed > 40
    plan = check_site_size(privacy, train, needed, rounds=5, site=1)  # enough data: accepted
    assert plan.noise_multiplier <= 2.0


# --- the real data sets, when present ---------------------------------------------------

@pytest.mark.skipif(not (SHARED / "banking77" / "train.jsonl").exists(), reason="../shared/data not present")
def test_real_presets_partition_as_documented():
    from fedslm.config.compose import register_schema, to_run_config_object
    from hydra import compose, initialize_config_dir

    register_schema()
    conf = Path(__file__).resolve().parents[1] / "conf"
    expected = {"medquad": 9, "banking77": 7, "pubmedqa": 3}
    for preset, n in expected.items():
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = to_run_config_object(compose(config_name="config", overrides=["output_dir=unused-run-dir", f"data={preset}"]))
        assert cfg.federation.sites == n
        table = site_table(cfg.data, n)
        assert len(table) == n and all(r["train"] > 0 and r["eval"] > 0 for r in table)
    total = sum(r["train"] + r["eval"] for r in site_table(cfg.data, 3))
    assert total == 500  # pubmedqa: all 500 rows, split over 3 sites


def test_separate_eval_file_follows_the_natural_partition(files, tmp_path):
    held = [{"question": f"held {s}{i}?", "answer": "x", "source": s} for s in "ABC" for i in range(4)]
    eval_path = _write_jsonl(tmp_path / "held.jsonl", held)
    cfg = _cfg(files / "qa.jsonl", partitioner="natural", partition_by="source", eval_path=str(eval_path))
    rows = site_rows(cfg, 1, 3)
    assert len(rows.train) == 10 and len(rows.eval) == 4
    assert set(rows.eval["source"]) == {rows.natural_id}
