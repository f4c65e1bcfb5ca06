"""FFA-LoRA aggregation is exact, A never moves, and bad replies never reach the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedslm.adapter import adapter_state, attach_lora, load_adapter_state
from fedslm.aggregation import FFALoRA
from fedslm.data.clinic import generate_site
from fedslm.data.tokenize import TokenizedDataset
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.reporting import RunRecorder
from fedslm.train import train_local
from fedslm.transport import from_record, record_bytes, to_record


def _instruction(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node, message_type="train")


def _reply(node: int, tensors: dict, n: int, site: int) -> Message:
    content = RecordDict({"arrays": to_record(tensors), "metrics": MetricRecord({"num-examples": n, "site": site, "epsilon": 0.0})})
    return Message(content, reply_to=_instruction(node))


def _a_matrices(pm) -> dict[str, torch.Tensor]:
    return {k: v for k, v in adapter_state(pm, trainable_only=False).items() if "lora_A" in k}


@pytest.fixture
def strategy_and_sites(tiny_cfg, tmp_path, flower_identity):
    model, tok = load_base_model(resolve_model_dir(tiny_cfg.model))
    pm = attach_lora(model, tiny_cfg.lora, freeze_a=True)
    a_before = _a_matrices(pm)
    global_b = adapter_state(pm)
    sites = []
    for site, n in enumerate([12, 30, 20]):
        load_adapter_state(pm, global_b)
        ds = TokenizedDataset.from_records(tok, generate_site(site, n, seed=2), 1024)
        train_local(pm, ds, tiny_cfg.train, tok.pad_token_id, seed=site)
        sites.append((adapter_state(pm), len(ds)))
    recorder = RunRecorder(tmp_path, rounds=1, meta={}, echo=lambda *_: None)
    strategy = FFALoRA(recorder, {k: tuple(v.shape) for k, v in global_b.items()}, min_train_nodes=2)
    return strategy, sites, pm, a_before, recorder


def test_ffa_aggregate_is_the_exact_weighted_mean_of_site_updates(strategy_and_sites):
    strategy, sites, pm, a_before, _ = strategy_and_sites
    replies = [_reply(100 + i, b, n, i) for i, (b, n) in enumerate(sites)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    agg = from_record(arrays)
    total = sum(n for _, n in sites)
    assert set(agg) == set(sites[0][0]) and all("lora_B" in k for k in agg)
    for key in agg:
        expected = sum(b[key].double() * n for b, n in sites) / total
        torch.testing.assert_close(agg[key].double(), expected, rtol=1e-6, atol=1e-9)

    # A never changed while training, so the aggregate's effective update B A equals
    # the weighted mean of the sites' effective updates B_i A
    a_after = _a_matrices(pm)
    assert all(torch.equal(a_before[k], a_after[k]) for k in a_before)
    for key_b in agg:
        a = a_after[key_b.replace("lora_B", "lora_A")].double()
        mean_update = sum((b[key_b].double() @ a) * n for b, n in sites) / total
        rel = (agg[key_b].double() @ a - mean_update).norm() / mean_update.norm()
        assert rel < 1e-6


def test_sites_share_the_frozen_a(tiny_cfg):
    m1, _ = load_base_model(resolve_model_dir(tiny_cfg.model))
    m2, _ = load_base_model(resolve_model_dir(tiny_cfg.model))
    torch.manual_seed(123)  # a different global RNG state must not change A
    a1, a2 = _a_matrices(attach_lora(m1, tiny_cfg.lora, True)), _a_matrices(attach_lora(m2, tiny_cfg.lora, True))
    assert all(torch.equal(a1[k], a2[k]) for k in a1)


def test_bad_replies_are_rejected_with_reasons(strategy_and_sites):
    strategy, sites, _, _, recorder = strategy_and_sites
    good = [_reply(100 + i, b, n, i) for i, (b, n) in enumerate(sites[:2])]
    b, n = sites[2]
    key = next(iter(b))
    nan = {**b, key: torch.full_like(b[key], float("nan"))}
    wrong_shape = {**b, key: torch.zeros(3, 3)}
    missing = {k: v for k, v in b.items() if k != key}
    errored = Message(Error(code=0, reason="BudgetExceededError: privacy budget exhausted"), reply_to=_instruction(105))
    bad = [_reply(101, nan, n, 2), _reply(102, wrong_shape, n, 2), _reply(103, missing, n, 2),
           _reply(104, b, 0, 2), errored]
    arrays, _ = strategy.aggregate_train(1, good + bad)
    reasons = recorder.log[1].rejected
    assert len(reasons) == 5
    assert any("NaN" in r for r in reasons) and any("shape" in r for r in reasons)
    assert any("missing" in r for r in reasons) and any("num-examples" in r for r in reasons)
    assert any("privacy budget exhausted" in r for r in reasons)
    # the aggregate is built from the two valid replies only
    (b0, n0), (b1, n1) = sites[:2]
    agg = from_record(arrays)
    torch.testing.assert_close(agg[key], (b0[key] * n0 + b1[key] * n1) / (n0 + n1))


def test_too_few_valid_replies_keep_the_global_adapter(strategy_and_sites):
    strategy, sites, _, _, _ = strategy_and_sites
    b, n = sites[0]
    arrays, metrics = strategy.aggregate_train(1, [_reply(100, b, n, 0)])  # min is 2
    assert arrays is None and metrics is None


def test_fp16_transport_halves_the_bytes():
    t = {"x.lora_B.weight": torch.randn(64, 8), "y.lora_B.weight": torch.randn(32, 8)}
    full, half = to_record(t, "float32"), to_record(t, "float16")
    raw32 = 4 * (64 + 32) * 8
    header = record_bytes(full) - raw32  # each array travels as .npy: payload + small header
    assert 0 <= header <= 2 * 256
    assert record_bytes(half) == raw32 // 2 + header
    back = from_record(half)
    assert back["x.lora_B.weight"].dtype == torch.float32
    torch.testing.assert_close(back["x.lora_B.weight"], t["x.lora_B.weight"], atol=2e-3, rtol=1e-3)
    assert isinstance(ArrayRecord({"a": Array(np.zeros(2, np.float16))}), ArrayRecord)


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_site_with_spent_budget_is_not_asked_again(strategy_and_sites):
    strategy, sites, _, _, recorder = strategy_and_sites
    (b0, n0), (b1, n1), _ = sites
    refused = Message(Error(code=1000, reason="BudgetExceededError: privacy budget exhausted: epsilon spent 8.0"),
                      reply_to=_instruction(102))
    strategy.aggregate_train(1, [_reply(100, b0, n0, 0), _reply(101, b1, n1, 1), refused])
    arrays = to_record({k: torch.zeros_like(v) for k, v in b0.items()})
    messages = strategy.configure_train(2, arrays, ConfigRecord(), _Grid([100, 101, 102]))
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 101]
    # evaluation spends no training privacy: the site is still evaluated
    messages = strategy.configure_evaluate(2, arrays, ConfigRecord(), _Grid([100, 101, 102]))
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 101, 102]
