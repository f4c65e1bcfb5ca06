"""What a site sends back: adapter tensors and numeric metrics, nothing else."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedslm.lora.adapter import adapter_state, attach_lora
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.privacy.accounting import BudgetExceededError
from fedslm.site.handlers import handle_evaluate, handle_train, runtime_for
from fedslm.transport import named_arrays, to_record

# what a private site releases besides the adapter, written out here (not read from
# fedslm.privacy.releases) so that a key added there fails this test until it is reviewed
TRAIN_METRICS = {"site", "lora_r", "a_digest", "epsilon", "epsilon_rdp", "epsilon_prv", "epsilon_lifetime",
                 "noise_multiplier", "sample_rate", "steps_total", "steps"}


def _global(cfg):
    model, _ = load_base_model(resolve_model_dir(cfg.model))
    return adapter_state(attach_lora(model, cfg.lora, freeze_a=True))


def _message(cfg, kind: str, server_round: int = 1) -> Message:
    content = RecordDict({"arrays": to_record(_global(cfg)), "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=11, message_type=kind)


_RUN_IDS = itertools.count(1000)


def _context(site: int = 1, run_id: int | None = None, **node_config) -> Context:
    # a fresh run id per context unless given: ledgers on disk are kept per run and site
    return Context(run_id=run_id if run_id is not None else next(_RUN_IDS), node_id=11,
                   node_config={"partition-id": site, "num-partitions": 3, **node_config},
                   state=RecordDict(), run_config={})


@pytest.mark.parametrize("dtype,np_dtype", [("float32", np.float32), ("float16", np.float16)])
def test_train_reply_carries_only_adapter_and_metrics(tiny_cfg, flower_identity, dtype, np_dtype):
    tiny_cfg.federation.transport_dtype = dtype
    expected = _global(tiny_cfg)
    reply = handle_train(_message(tiny_cfg, "train"), _context(), tiny_cfg, progress=False)
    content = reply.content
    assert list(content.array_records) == ["arrays"]
    assert list(content.metric_records) == ["metrics"]
    assert not content.config_records  # no free-form strings, no token ids, no text
    assert len(content.array_records["arrays"]) == 1  # one packed array: a handful of objects per message
    arrays = named_arrays(content.array_records["arrays"])
    assert set(arrays) == set(expected) and all(".lora_B." in k for k in arrays)
    for key, arr in arrays.items():
        assert arr.dtype == np_dtype and tuple(arr.shape) == tuple(expected[key].shape)
    metrics = content.metric_records["metrics"]
    assert set(metrics) == TRAIN_METRICS
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
    assert metrics["site"] == 1 and 0 < metrics["epsilon"] <= tiny_cfg.privacy.epsilon
    # both accountants are reported; PRV (the default) enforces, RDP's bound on the same steps is looser
    assert metrics["epsilon"] == metrics["epsilon_prv"] and 0 < metrics["epsilon_prv"] <= metrics["epsilon_rdp"]
    # the update is real: B moved away from the zero it was sent as
    assert any(np.abs(a).max() > 0 for a in arrays.values())


def test_model_is_built_once_per_process(tiny_cfg, flower_identity):
    first = runtime_for(tiny_cfg)
    handle_train(_message(tiny_cfg, "train"), _context(), tiny_cfg, progress=False)
    handle_evaluate(_message(tiny_cfg, "evaluate"), _context(site=2), tiny_cfg)
    assert runtime_for(tiny_cfg) is first
    # a different adapter is a different runtime (the cache is keyed by what it builds)
    tiny_cfg.lora.r = tiny_cfg.lora.r // 2
    other = runtime_for(tiny_cfg)
    assert other is not first and other.rank == tiny_cfg.lora.r


def test_evaluate_reply_is_metrics_only(tiny_cfg, flower_identity):
    reply = handle_evaluate(_message(tiny_cfg, "evaluate"), _context(), tiny_cfg)
    assert not reply.content.array_records and not reply.content.config_records
    assert set(reply.content.metric_records["metrics"]) == {"site", "eval_loss"}


def test_epsilon_accumulates_in_node_state_and_site_refuses_past_budget(tiny_cfg, flower_identity):
    ctx = _context(site=0)
    eps = []
    for r in range(1, tiny_cfg.federation.rounds + 1):
        reply = handle_train(_message(tiny_cfg, "train", r), ctx, tiny_cfg, progress=False)
        eps.append(reply.content.metric_records["metrics"]["epsilon"])
    assert eps[0] < eps[1] <= tiny_cfg.privacy.epsilon
    # the ledger is on the site's disk (a simulation's: the run directory), not in node state
    assert not ctx.state.config_records
    assert len(list((Path(tiny_cfg.output_dir) / "ledgers").glob("ledger-*.json"))) == 1
    with pytest.raises(BudgetExceededError, match="refuses to train"):
        handle_train(_message(tiny_cfg, "train", 99), ctx, tiny_cfg, progress=False)
    # a fresh node state (another site) still has its whole budget
    handle_train(_message(tiny_cfg, "train", 1), _context(site=2), tiny_cfg, progress=False)


def test_ledger_survives_a_client_restart(tiny_cfg, flower_identity, tmp_path):
    """A restarted SuperNode has an empty node state; the site's ledger file on its own
    disk still holds what was spent, so epsilon continues instead of restarting at 0."""
    tiny_cfg.privacy.ledger_dir = str(tmp_path)
    first = _context(site=0, run_id=4242)
    eps1 = handle_train(_message(tiny_cfg, "train", 1), first, tiny_cfg, progress=False).content.metric_records["metrics"]["epsilon"]
    restarted = _context(site=0, run_id=4242)
    assert not restarted.state.config_records
    eps2 = handle_train(_message(tiny_cfg, "train", 2), restarted, tiny_cfg, progress=False).content.metric_records["metrics"]["epsilon"]
    assert eps2 > eps1
    with pytest.raises(BudgetExceededError):  # the budget of 2 rounds is spent across the restart
        handle_train(_message(tiny_cfg, "train", 3), _context(site=0, run_id=4242), tiny_cfg, progress=False)
    (ledger,) = tmp_path.glob("ledger-*.json")
    assert list(json.loads(ledger.read_text())["runs"]) == ["flwr-4242"]


def test_malformed_global_adapter_is_refused(tiny_cfg, flower_identity):
    bad = {k: torch.zeros(2, 2) for k in _global(tiny_cfg)}
    content = RecordDict({"arrays": to_record(bad), "config": ConfigRecord({"server-round": 1})})
    with pytest.raises(ValueError, match="shape"):
        handle_train(Message(content, dst_node_id=11, message_type="train"), _context(), tiny_cfg, progress=False)


def test_site_reads_its_own_file_from_node_config(tiny_cfg, flower_identity, tmp_path, capsys):
    """The path comes from the node config, not the run's config; a private reply carries
    no count, but the sampling rate it must release is that file's (Opacus: 1 / batches per epoch)."""
    import json

    from fedslm.config import ConfigError

    def write(name: str, n: int):
        rows = [{"question": f"Is {i} a number?", "reply": f"Yes, {i} is."} for i in range(n)]
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def node(path, site: int = 5) -> Context:
        return Context(run_id=next(_RUN_IDS), node_id=11, node_config={"site-id": site, "data-path": str(path)},
                       state=RecordDict(), run_config={})

    path, other = write("site_own.jsonl", 40), write("site_other.jsonl", 30)
    tiny_cfg.data.prompt_columns = ["question"]
    tiny_cfg.data.answer_column = "reply"
    tiny_cfg.train.local_steps = 1  # the counts are the point, not the training
    assert tiny_cfg.data.path is None  # the run's config names no file: only the node config does
    reply = handle_train(_message(tiny_cfg, "train"), node(path), tiny_cfg, progress=False)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["site"] == 5 and metrics["sample_rate"] == pytest.approx(1 / math.ceil(36 / tiny_cfg.train.batch_size))
    assert "site 5: 36 train / 4 held-out examples (its own data)" in capsys.readouterr().out  # 40 rows, 10% held out
    # no record that could carry the path or a row's text (config records hold strings)
    assert set(reply.content) == {"arrays", "metrics"} and not reply.content.config_records
    # the same site id with another file (30 rows: 27 train, 3 held out) uses that file
    reply = handle_train(_message(tiny_cfg, "train"), node(other), tiny_cfg, progress=False)
    assert reply.content.metric_records["metrics"]["sample_rate"] == pytest.approx(1 / math.ceil(27 / tiny_cfg.train.batch_size))
    handle_evaluate(_message(tiny_cfg, "evaluate"), node(other), tiny_cfg)
    assert "site 5: 27 train / 3 held-out examples (its own data)" in capsys.readouterr().out
    # and a node config naming a file that is not there fails with that path
    missing = tmp_path / "not_there.jsonl"
    with pytest.raises(ConfigError, match=f"data.path: '{re.escape(str(missing))}' does not exist"):
        handle_train(_message(tiny_cfg, "train"), node(missing, site=6), tiny_cfg, progress=False)


def test_site_trains_the_rank_its_node_config_sets(tiny_cfg, flower_identity):
    """A deployed site with less hardware sets --node-config lora-r=2: under exact it trains
    and sends rank 2 (the leading components of the global); under ffa it refuses."""
    from fedslm.config import ConfigError
    from fedslm.lora.schemes import make_scheme

    with pytest.raises(ConfigError, match="heterogeneous ranks need strategy=exact or stack"):
        handle_train(_message(tiny_cfg, "train"), _context(**{"lora-r": 2}), tiny_cfg, progress=False)
    with pytest.raises(ConfigError, match="the global rank"):
        handle_train(_message(tiny_cfg, "train"), _context(**{"lora-r": 99}), tiny_cfg, progress=False)

    tiny_cfg.strategy.name = "exact"
    model, _ = load_base_model(resolve_model_dir(tiny_cfg.model))
    full = adapter_state(attach_lora(model, tiny_cfg.lora, freeze_a=False), trainable_only=False)
    g = make_scheme("exact", full, tiny_cfg.lora.r, tiny_cfg.lora.alpha).initial_global()
    msg = Message(RecordDict({"arrays": to_record(g), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=11, message_type="train")
    reply = handle_train(msg, _context(**{"lora-r": 2}), tiny_cfg, progress=False)
    arrays, metrics = named_arrays(reply.content.array_records["arrays"]), reply.content.metric_records["metrics"]
    assert metrics["lora_r"] == 2
    for key, arr in arrays.items():
        full_shape = tuple(g[key].shape)
        want = (2, full_shape[1]) if ".lora_A." in key else (full_shape[0], 2)
        assert tuple(arr.shape) == want


def test_a_round_sent_again_is_answered_from_the_saved_reply_not_trained_twice(tiny_cfg, flower_identity, tmp_path):
    """After a coordinator crash the site may receive the dead run's round and then the
    resumed run's same round (same run key, round and global adapter): the second answer is
    the first reply, and the ledger is charged once. Another global adapter trains again."""
    def message(server_round: int, shift: float = 0.0) -> Message:
        g = {k: v + shift for k, v in _global(tiny_cfg).items()}
        config = ConfigRecord({"server-round": server_round, "run-key": "crashed-run"})
        return Message(RecordDict({"arrays": to_record(g), "config": config}), dst_node_id=11, message_type="train")

    def node() -> Context:  # a fresh ClientApp process: empty node state, same disk
        return _context(site=0)

    tiny_cfg.privacy.ledger_dir = str(tmp_path)

    def ledger_text() -> str:
        (ledger,) = tmp_path.glob("ledger-*.json")
        return ledger.read_text()

    first = handle_train(message(1), node(), tiny_cfg, progress=False).content
    spent = ledger_text()
    again = handle_train(message(1), node(), tiny_cfg, progress=False).content
    assert ledger_text() == spent  # not charged twice
    assert dict(again.metric_records["metrics"]) == dict(first.metric_records["metrics"])
    for k, arr in first["arrays"].items():
        assert arr.data == again["arrays"][k].data
    # the same round from another global adapter is another release: it trains and spends
    other = handle_train(message(1, shift=0.01), node(), tiny_cfg, progress=False).content
    assert other.metric_records["metrics"]["epsilon"] > first.metric_records["metrics"]["epsilon"]
    assert any(arr.data != other["arrays"][k].data for k, arr in first["arrays"].items())
