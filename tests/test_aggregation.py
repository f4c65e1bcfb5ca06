"""LoRA-aware aggregation: exactness per scheme, SVD truncation, server optimisers, robust
rules, deterministic sampling, and every kind of bad reply rejected while the round goes on."""

from __future__ import annotations

import random
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedslm.lora.adapter import a_digest, adapter_state, attach_lora, load_adapter_state
from fedslm.server.strategy import LoraSetup, build_strategy
from fedslm.config import StrategyConfig
from fedslm.data.clinic import generate_site
from fedslm.data.tokenize import TokenizedDataset
from fedslm.lora.algebra import a_key, b_key, dense
from fedslm.lora.schemes import SiteUpdate, make_scheme
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.server.record import RunRecorder
from fedslm.train import train_local
from fedslm.transport import from_record, record_bytes, to_record

LAYERS = {"m.l0.q_proj": (12, 10), "m.l0.down_proj": (10, 16)}  # layer -> (out, in)
RANK, ALPHA = 4, 8


def synthetic_init(rank: int = RANK, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer, (o, i) in LAYERS.items():
        out[a_key(layer)] = (torch.rand(rank, i, generator=g) * 2 - 1) / i ** 0.5
        out[b_key(layer)] = torch.zeros(o, rank)
    return out


def trained(scheme, g, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """What a site of rank `rank` might send: its start plus a random step on what it trains."""
    gen = torch.Generator().manual_seed(100 + seed)
    start = scheme.site_start(g, rank, synthetic_init(rank))
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in start.items()}


def mean_effective(scheme, updates) -> dict[str, torch.Tensor]:
    """By hand, not through the scheme: a site of rank r changes a layer by (alpha / r) B @ A,
    with its own A if it sent one, else (FFA) the frozen initial A; the aggregate is the
    weighted mean of those changes."""
    total = sum(u.weight for u in updates)
    init = synthetic_init()
    out = {}
    for layer in LAYERS:
        out[layer] = sum((ALPHA / u.rank) * u.tensors[b_key(layer)].double()
                         @ u.tensors.get(a_key(layer), init[a_key(layer)]).double() * (u.weight / total)
                         for u in updates)
    return out


def test_ffa_and_stack_aggregates_are_exact_weighted_means_of_effective_updates():
    for name, ranks in (("ffa", [RANK] * 3), ("stack", [4, 2, 1])):
        scheme = make_scheme(name, synthetic_init(), RANK, ALPHA)
        g = scheme.initial_global()
        updates = [SiteUpdate(trained(scheme, g, r, i), r, w) for i, (r, w) in enumerate(zip(ranks, [10.0, 30.0, 20.0]))]
        new, aggregate = scheme.combine(g, updates, "mean", 0.0)
        want = mean_effective(scheme, updates)
        for layer in LAYERS:
            got = dense(aggregate[layer])
            torch.testing.assert_close(got, want[layer], rtol=1e-5, atol=1e-7)  # fp32 aggregate
        if name == "stack":  # the stack (scale folded in) is the next global: rank grew by 4+2+1
            rank, alpha, view = scheme.peft_view(new)
            assert rank == 7 and alpha == 7.0
            for layer in LAYERS:
                torch.testing.assert_close((view[b_key(layer)] @ view[a_key(layer)]).double(), want[layer], rtol=1e-5, atol=1e-7)
        else:  # A never moves: only B goes up and down
            assert all(".lora_B." in k for k in new)


def test_fedavg_averages_factors_apart_and_the_error_shows_it():
    scheme = make_scheme("fedavg", synthetic_init(), RANK, ALPHA)
    g = scheme.initial_global()
    updates = [SiteUpdate(trained(scheme, g, RANK, i), RANK, 1.0) for i in range(3)]
    new, aggregate = scheme.combine(g, updates, "mean", 0.0)
    for k in new:
        torch.testing.assert_close(new[k], sum(u.tensors[k] for u in updates) / 3)
    want = mean_effective(scheme, updates)
    err = sum(float((dense(aggregate[l]) - want[l]).norm() ** 2) for l in LAYERS) ** 0.5 / \
        sum(float(want[l].norm() ** 2) for l in LAYERS) ** 0.5
    assert err > 0.05  # mean(B) mean(A) is not mean(B A)


def test_exact_truncation_error_is_the_discarded_singular_values():
    scheme = make_scheme("exact", synthetic_init(), RANK, ALPHA)
    g = scheme.initial_global()
    updates = [SiteUpdate(trained(scheme, g, r, i), r, w) for i, (r, w) in enumerate(zip([4, 3, 2], [5.0, 1.0, 2.0]))]
    new, aggregate = scheme.combine(g, updates, "mean", 0.0)
    want = mean_effective(scheme, updates)
    discarded2 = total2 = 0.0
    for layer in LAYERS:
        s = torch.linalg.svdvals(want[layer])
        discarded2 += float((s[RANK:] ** 2).sum())
        total2 += float((s ** 2).sum())
        # the new global is the best rank-4 approximation, in peft's own form (scale * B @ A)
        best = torch.linalg.svd(want[layer])
        best = best.U[:, :RANK] @ torch.diag(best.S[:RANK]) @ best.Vh[:RANK]
        got = (ALPHA / RANK) * new[b_key(layer)].double() @ new[a_key(layer)].double()
        torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-6)
    from fedslm.lora.algebra import relative_error, weighted_sum

    err = relative_error(aggregate, weighted_sum([scheme.update_terms(u.tensors, u.rank) for u in updates],
                                                 [u.weight for u in updates]))
    assert discarded2 > 0
    assert err == pytest.approx((discarded2 / total2) ** 0.5, rel=1e-5)
    # the same error by hand, on the dense matrices
    hand = sum(float((dense(aggregate[l]) - want[l]).norm() ** 2) for l in LAYERS) ** 0.5 / total2 ** 0.5
    assert hand == pytest.approx((discarded2 / total2) ** 0.5, rel=1e-5)
    # a lower-rank site starts from the leading components of the global
    start = scheme.site_start(new, 2, None)
    assert start[a_key("m.l0.q_proj")].shape == (2, 10) and start[b_key("m.l0.q_proj")].shape == (12, 2)


def test_median_ignores_one_wild_site_and_the_mean_does_not():
    scheme = make_scheme("ffa", synthetic_init(), RANK, ALPHA)
    g = scheme.initial_global()
    updates = [SiteUpdate(trained(scheme, g, RANK, i), RANK, 1.0) for i in range(5)]
    wild = {k: v * 1000 for k, v in updates[0].tensors.items()}
    attacked = [SiteUpdate(wild, RANK, 1.0)] + updates[1:]
    median, _ = scheme.combine(g, attacked, "median", 0.0)
    trimmed, _ = scheme.combine(g, attacked, "trimmed_mean", 0.2)
    mean, _ = scheme.combine(g, attacked, "mean", 0.0)
    honest = max(float(u.tensors[k].abs().max()) for u in updates for k in u.tensors)
    for k in median:
        assert float(median[k].abs().max()) <= honest and float(trimmed[k].abs().max()) <= honest
        assert float(mean[k].abs().max()) > 10 * honest

    # exact: the rule acts on the dense effective updates, then the SVD re-factors
    scheme = make_scheme("exact", synthetic_init(), RANK, ALPHA)
    g = scheme.initial_global()
    updates = [SiteUpdate(trained(scheme, g, RANK, i), RANK, 1.0) for i in range(5)]
    attacked = [SiteUpdate({k: v * 1000 for k, v in updates[0].tensors.items()}, RANK, 1.0)] + updates[1:]
    honest = {layer: max(float(dense(scheme.update_terms(u.tensors, u.rank)[layer]).abs().max()) for u in updates)
              for layer in LAYERS}
    new, _ = scheme.combine(g, attacked, "median", 0.0)
    for layer in LAYERS:
        got = dense(scheme.update_terms(new, RANK)[layer])
        assert float(got.abs().max()) < 2 * honest[layer]


# --- the Flower strategy ----------------------------------------------------------------

class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _instruction(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node, message_type="train")


def _reply(node: int, tensors, n: int, site: int, rank: int = RANK, a: int | None = None) -> Message:
    # an FFA site fingerprints the frozen A it trained with (the shared synthetic_init's)
    a = a_digest(synthetic_init()) if a is None else a
    metrics = MetricRecord({"num-examples": n, "site": site, "lora_r": rank, "epsilon": 0.0, "a_digest": a})
    arrays = tensors if isinstance(tensors, ArrayRecord) else to_record(tensors)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=_instruction(node))


def _strategy(tmp_path, name="ffa", min_train=2, **st_kwargs):
    scheme = make_scheme(name, synthetic_init(), RANK, ALPHA)
    recorder = RunRecorder(tmp_path, rounds=3, meta={}, echo=lambda *_: None)
    st = StrategyConfig(name=name, **st_kwargs)
    strategy = build_strategy(LoraSetup(scheme, recorder, st, seed=3), st, fraction_train=1.0,
                              min_train_nodes=min_train, min_evaluate_nodes=1, min_available_nodes=1)
    return strategy, scheme, recorder


def _start_round(strategy, scheme, r, nodes=(100, 101, 102, 103), g=None):
    g = scheme.initial_global() if g is None else g
    return list(strategy.configure_train(r, to_record(g), ConfigRecord(), _Grid(nodes))), g


def test_every_kind_of_bad_reply_is_rejected_and_the_round_goes_on(tmp_path, flower_identity):
    strategy, scheme, recorder = _strategy(tmp_path, "ffa")
    _, g = _start_round(strategy, scheme, 1)
    good = [trained(scheme, g, RANK, i) for i in range(4)]
    key = b_key("m.l0.q_proj")
    bad = {
        "NaN": {**good[0], key: torch.full_like(good[0][key], float("nan"))},
        "shape": {**good[0], key: torch.zeros(3, 3)},
        "missing": {k: v for k, v in good[0].items() if k != key},
        "identically zero": {k: torch.zeros_like(v) for k, v in good[0].items()},
        "huge": {k: v * 1e4 for k, v in good[0].items()},
    }
    replies = [_reply(100 + i, t, 10 * (i + 1), i) for i, t in enumerate(good)]
    replies += [_reply(200 + i, t, 10, 10 + i) for i, t in enumerate(bad.values())]
    replies += [
        _reply(300, good[0], 0, 20),  # no weight
        _reply(301, good[0], 10, 21, rank=2),  # rank ffa cannot take
        _reply(302, ArrayRecord({k: Array(v.numpy().astype(np.int32)) for k, v in good[0].items()}), 10, 22),
        Message(Error(code=1000, reason="BudgetExceededError: privacy budget exhausted"), reply_to=_instruction(303)),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    reasons = recorder.log[1].rejected
    assert len(reasons) == len(bad) + 4, reasons
    for word in ("NaN", "shape", "missing", "identically zero", "x the round's median", "num-examples",
                 "needs every site at the global rank", "dtype int32", "privacy budget exhausted"):
        assert any(word in r for r in reasons), word
    weights = [10, 20, 30, 40]
    agg = from_record(arrays)
    torch.testing.assert_close(agg[key], sum(t[key] * w for t, w in zip(good, weights)) / sum(weights))
    assert strategy.errors[1] < 1e-6

    # round 2 starts from that aggregate: a site that sends it back unchanged is caught
    _start_round(strategy, scheme, 2, g=agg)
    back = strategy.sent
    _, _ = strategy.aggregate_train(2, [_reply(100, back, 10, 0), _reply(101, good[1], 10, 1), _reply(102, good[2], 10, 2)])
    assert any("identical to the adapter the site received" in r for r in recorder.log[2].rejected)


def test_too_few_valid_replies_keep_the_global_adapter(tmp_path, flower_identity):
    strategy, scheme, _ = _strategy(tmp_path, "ffa", min_train=2)
    _, g = _start_round(strategy, scheme, 1)
    arrays, metrics = strategy.aggregate_train(1, [_reply(100, trained(scheme, g, RANK, 0), 10, 0)])
    assert arrays is None and metrics is None
    # the same reply with a second valid one is enough: the refusal above is the count's doing
    arrays, metrics = strategy.aggregate_train(1, [_reply(100, trained(scheme, g, RANK, 0), 10, 0),
                                                   _reply(101, trained(scheme, g, RANK, 1), 10, 1)])
    assert arrays is not None and set(from_record(arrays)) == set(g)


def test_sampling_is_deterministic_under_the_seed(tmp_path, flower_identity):
    nodes = list(range(500, 520))

    def draws(seed):
        strategy, scheme, _ = _strategy(tmp_path, "ffa", min_train=1)
        strategy.setup.seed, strategy.setup.per_round = seed, 5
        return [sorted(m.metadata.dst_node_id for m in _start_round(strategy, scheme, r, nodes)[0]) for r in (1, 2, 3)]

    first = draws(3)
    assert first == draws(3)
    assert all(len(d) == 5 and set(d) <= set(nodes) for d in first)
    assert len({tuple(d) for d in first}) > 1  # rounds draw different sites
    assert first != draws(4)


def test_site_with_spent_budget_is_not_asked_again(tmp_path, flower_identity):
    strategy, scheme, _ = _strategy(tmp_path, "ffa")
    _, g = _start_round(strategy, scheme, 1, nodes=(100, 101, 102))
    refused = Message(Error(code=1000, reason="BudgetExceededError: privacy budget exhausted: epsilon spent 8.0"),
                      reply_to=_instruction(102))
    strategy.aggregate_train(1, [_reply(100, trained(scheme, g, RANK, 0), 5, 0),
                                 _reply(101, trained(scheme, g, RANK, 1), 5, 1), refused])
    messages, _ = _start_round(strategy, scheme, 2, nodes=(100, 101, 102))
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 101]
    # evaluation spends no training privacy: the site is still evaluated
    messages = strategy.configure_evaluate(2, to_record(g), ConfigRecord(), _Grid([100, 101, 102]))
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 101, 102]


def test_fedadam_keeps_its_moments_across_rounds(tmp_path, flower_identity):
    strategy, scheme, _ = _strategy(tmp_path, "ffa", server_optimizer="fedadam", server_lr=0.1, beta_1=0.9,
                                    beta_2=0.99, tau=1e-3)
    assert type(strategy).__mro__[1].__name__ == "FedAdam"
    g = {k: v.double().numpy() for k, v in scheme.initial_global().items()}
    m = {k: np.zeros_like(v) for k, v in g.items()}
    v_ = {k: np.zeros_like(x) for k, x in g.items()}
    for r in (1, 2):
        _, sent = _start_round(strategy, scheme, r, g={k: torch.from_numpy(x).float() for k, x in g.items()})
        sites = [trained(scheme, sent, RANK, 10 * r + i) for i in range(3)]
        arrays, _ = strategy.aggregate_train(r, [_reply(100 + i, t, 10, i) for i, t in enumerate(sites)])
        mean = {k: sum(t[k].double().numpy() for t in sites) / 3 for k in g}
        eta = 0.1 * np.sqrt(1 - 0.99 ** (r + 1)) / (1 - 0.9 ** (r + 1))
        for k in g:
            delta = mean[k] - g[k]
            m[k] = 0.9 * m[k] + 0.1 * delta
            v_[k] = 0.99 * v_[k] + 0.01 * delta ** 2
            g[k] = g[k] + eta * m[k] / (np.sqrt(v_[k]) + 1e-3)
        got = from_record(arrays)
        for k in g:  # round 2 only matches if round 1's m and v were kept
            np.testing.assert_allclose(got[k].numpy(), g[k], rtol=1e-4, atol=1e-6)
    assert strategy.m_t is not None and strategy.v_t is not None


def test_fedavgm_momentum_carries_over(tmp_path, flower_identity):
    strategy, scheme, _ = _strategy(tmp_path, "fedavg", server_optimizer="fedavgm", server_lr=1.0, server_momentum=0.5)
    g = scheme.initial_global()
    steps = []
    for r in (1, 2):
        _, sent = _start_round(strategy, scheme, r, g=g)
        sites = [trained(scheme, sent, RANK, 10 * r + i) for i in range(2)]
        arrays, _ = strategy.aggregate_train(r, [_reply(100 + i, t, 10, i) for i, t in enumerate(sites)])
        mean = {k: sum(t[k] for t in sites) / 2 for k in g}
        steps.append({k: g[k] - mean[k] for k in g})  # pseudo-gradient
        new = from_record(arrays)
        want_step = steps[0] if r == 1 else {k: 0.5 * steps[0][k] + steps[1][k] for k in g}
        for k in g:
            torch.testing.assert_close(new[k], g[k] - want_step[k], rtol=1e-5, atol=1e-6)
        g = new


def test_ffa_aggregate_of_real_training_is_exact_and_a_never_moves(tiny_cfg, tmp_path, flower_identity):
    model, tok = load_base_model(resolve_model_dir(tiny_cfg.model))
    pm = attach_lora(model, tiny_cfg.lora, freeze_a=True)
    full = adapter_state(pm, trainable_only=False)
    scheme = make_scheme("ffa", full, tiny_cfg.lora.r, tiny_cfg.lora.alpha)
    global_b = scheme.initial_global()
    sites = []
    for site, n in enumerate([12, 30, 20]):
        load_adapter_state(pm, global_b)
        ds = TokenizedDataset.from_records(tok, generate_site(site, n, seed=2), 1024)
        train_local(pm, ds, tiny_cfg.train, tok.pad_token_id, seed=site)
        sites.append(SiteUpdate(adapter_state(pm), tiny_cfg.lora.r, float(len(ds))))
    a_after = {k: v for k, v in adapter_state(pm, trainable_only=False).items() if ".lora_A." in k}
    assert a_after and all(torch.equal(full[k], a_after[k]) for k in a_after)
    # the sites really trained, each to a different B (else any average would pass)
    assert all(set(u.tensors) == set(global_b) for u in sites)
    for i, u in enumerate(sites):
        assert any(float((u.tensors[k] - global_b[k]).abs().max()) > 0 for k in global_b)
        assert all(not torch.equal(u.tensors[k], sites[i - 1].tensors[k]) for k in global_b)
    new, aggregate = scheme.combine(global_b, sites, "mean", 0.0)
    # reference by hand, from what the sites sent: B's weighted mean (weights = the sites'
    # example counts), A the frozen initial one, peft's scale alpha / r
    weights = [12.0, 30.0, 20.0]
    assert [u.weight for u in sites] == weights  # every generated example survives tokenising
    scale = tiny_cfg.lora.alpha / tiny_cfg.lora.r
    mean_b = {k: sum(u.tensors[k].double() * w for u, w in zip(sites, weights)) / sum(weights) for k in global_b}
    assert list(new) == list(global_b)  # only B goes back, in the global's order
    for k in global_b:
        torch.testing.assert_close(new[k].double(), mean_b[k], rtol=1e-6, atol=1e-9)
    layers = {k.split(".lora_B.")[0] for k in global_b}
    assert set(aggregate) == layers
    for layer in layers:
        want = scale * mean_b[f"{layer}.lora_B.weight"] @ full[f"{layer}.lora_A.weight"].double()
        got = sum(c * b.double() @ a.double() for c, b, a in aggregate[layer])
        rel = (got - want).norm() / want.norm()
        assert rel < 1e-6  # fp32 rounding of the averaged B; fedavg is off by percent
    # and that is the change peft itself makes to the layer once the new B is loaded
    load_adapter_state(pm, new)
    for layer in sorted(layers)[:2]:
        delta = pm.get_submodule(layer).get_delta_weight("default").double()
        want = scale * mean_b[f"{layer}.lora_B.weight"] @ full[f"{layer}.lora_A.weight"].double()
        assert (delta - want).norm() / want.norm() < 1e-5  # peft computes in fp32


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


def _uniform_strategy(tmp_path, min_train=2):
    """The strategy as a DP run builds it (uniform weights: privacy.enabled)."""
    scheme = make_scheme("ffa", synthetic_init(), RANK, ALPHA)
    recorder = RunRecorder(tmp_path, rounds=3, meta={}, echo=lambda *_: None)
    st = StrategyConfig(name="ffa")
    strategy = build_strategy(LoraSetup(scheme, recorder, st, seed=3, uniform_weights=True), st, fraction_train=1.0,
                              min_train_nodes=min_train, min_evaluate_nodes=1, min_available_nodes=1)
    return strategy, scheme, recorder


def test_a_site_claiming_a_huge_weight_does_not_steer_a_private_aggregate(tmp_path, flower_identity):
    """The attack that worked: one site reporting num-examples=1e9 became the aggregate
    (cosine 1.0). Under DP weights come from the protocol (uniform), not the reply."""
    strategy, scheme, _ = _uniform_strategy(tmp_path)
    _, g = _start_round(strategy, scheme, 1)
    updates = [trained(scheme, g, RANK, i) for i in range(3)]
    claims = [1e9, 10, 10]
    new, _ = strategy.aggregate_train(1, [_reply(100 + i, u, n, i) for i, (u, n) in enumerate(zip(updates, claims))])
    new = from_record(new)
    for k in new:
        plain_mean = sum(u[k] for u in updates) / 3  # every site counts the same
        torch.testing.assert_close(new[k], plain_mean)
    # and the claim is not needed at all: a reply without a count is a valid private reply
    strategy, scheme, _ = _uniform_strategy(tmp_path)
    _, g = _start_round(strategy, scheme, 1)
    replies = [_reply(100 + i, trained(scheme, g, RANK, i), 10, i) for i in range(2)]
    del replies[0].content.metric_records["metrics"]["num-examples"]
    assert strategy.aggregate_train(1, replies)[0] is not None


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -5.0, 0.0])
def test_non_finite_or_non_positive_weights_are_rejected_and_the_aggregate_stays_finite(tmp_path, flower_identity, weight):
    strategy, scheme, recorder = _strategy(tmp_path, "ffa", min_train=2)
    _, g = _start_round(strategy, scheme, 1)
    replies = [_reply(100 + i, trained(scheme, g, RANK, i), 10, i) for i in range(3)]
    replies[1].content.metric_records["metrics"]["num-examples"] = weight
    new, _ = strategy.aggregate_train(1, replies)
    new = from_record(new)
    assert all(torch.isfinite(t).all() for t in new.values())
    assert any("num-examples" in line and "finite positive" in line for line in recorder.log[1].rejected)
    good = [trained(scheme, g, RANK, i) for i in (0, 2)]
    for k in new:
        torch.testing.assert_close(new[k], (good[0][k] + good[1][k]) / 2)


def test_a_non_finite_aggregate_never_becomes_the_global_adapter(tmp_path, flower_identity, monkeypatch):
    """Replies are checked finite one by one; should the combination overflow all the same,
    the aggregate is checked before it becomes global."""
    strategy, scheme, recorder = _uniform_strategy(tmp_path)
    _, g = _start_round(strategy, scheme, 1)
    combine = scheme.combine

    def overflowing(*args, **kwargs):
        new, aggregate = combine(*args, **kwargs)
        return {k: v * float("inf") for k, v in new.items()}, aggregate

    monkeypatch.setattr(scheme, "combine", overflowing)
    arrays, _ = strategy.aggregate_train(1, [_reply(100 + i, trained(scheme, g, RANK, i), 10, i) for i in range(2)])
    assert arrays is None
    monkeypatch.setattr(scheme, "combine", combine)
    arrays, _ = strategy.aggregate_train(1, [_reply(100 + i, trained(scheme, g, RANK, i), 10, i) for i in range(2)])
    assert arrays is not None and all(torch.isfinite(t).all() for t in from_record(arrays).values())


def test_the_norm_check_works_with_two_replies_against_the_previous_round(tmp_path, flower_identity):
    strategy, scheme, recorder = _uniform_strategy(tmp_path)
    _, g = _start_round(strategy, scheme, 1)
    arrays, _ = strategy.aggregate_train(1, [_reply(100 + i, trained(scheme, g, RANK, i), 10, i) for i in range(2)])
    assert arrays is not None and strategy.last_norm > 0
    g2 = from_record(arrays)
    _, g2 = _start_round(strategy, scheme, 2, g=g2)
    honest = trained(scheme, g2, RANK, 7)
    blown = {k: g2[k] + 1000 * (v - g2[k]) if ".lora_B." in k else v for k, v in trained(scheme, g2, RANK, 8).items()}
    arrays, _ = strategy.aggregate_train(2, [_reply(100, honest, 10, 0), _reply(101, blown, 10, 1)])
    assert any("site 1" in line and "previous round's median" in line for line in recorder.log[2].rejected)
    assert not any(line.startswith("site 0") for line in recorder.log[2].rejected)


def test_an_ffa_site_whose_frozen_a_differs_is_rejected(tmp_path, flower_identity):
    """aggregation_error uses the server's A on both sides, so it cannot see a site that
    trained on another A; the site's A fingerprint can."""
    strategy, scheme, recorder = _strategy(tmp_path, "ffa", min_train=1)
    _, g = _start_round(strategy, scheme, 1)
    other_a = a_digest(synthetic_init(seed=1))
    assert other_a != a_digest(synthetic_init())
    replies = [_reply(100, trained(scheme, g, RANK, 0), 10, 0), _reply(101, trained(scheme, g, RANK, 1), 10, 1, a=other_a)]
    assert strategy.aggregate_train(1, replies)[0] is not None
    assert [line.split(":")[0] for line in recorder.log[1].rejected] == ["node 101"]
    assert "frozen A differs" in recorder.log[1].rejected[0]


def test_participation_keeps_every_site_within_its_calibrated_rounds(tmp_path, flower_identity):
    """FlowerTune's shape: 10 sites, 2 a round. Each site is calibrated for
    ceil(rounds x 2 / 10) rounds; the schedule never asks a site for more while others
    have trained less, so no site refuses for budget and every round has 2 sites."""
    from fedslm.config import FederationConfig
    from fedslm.privacy.accounting import expected_rounds

    nodes = list(range(700, 710))
    for seed, rounds in ((3, 3), (5, 10), (8, 7)):
        strategy, scheme, recorder = _strategy(tmp_path / f"{seed}", "ffa", min_train=1)
        strategy.setup.seed, strategy.setup.per_round = seed, 2
        planned = expected_rounds(FederationConfig(sites=10, rounds=rounds, sites_per_round=2))
        g = scheme.initial_global()
        for r in range(1, rounds + 1):
            asked = [m.metadata.dst_node_id for m in _start_round(strategy, scheme, r, nodes, g)[0]]
            assert len(asked) == 2
            strategy.aggregate_train(r, [_reply(n, trained(scheme, g, RANK, n - 700), 5, n - 700) for n in asked])
        counts = recorder.rounds_trained()
        assert max(counts.values()) == planned and sum(counts.values()) == 2 * rounds
        # a uniform draw over the same rounds and seeds asks some site more often
    uniform = [random.Random(3 * 100_003 + r).sample(nodes, 2) for r in range(1, 11)]
    assert max(sum(n in u for u in uniform) for n in nodes) > expected_rounds(
        FederationConfig(sites=10, rounds=10, sites_per_round=2))


def test_a_site_silent_in_training_is_not_asked_to_evaluate_the_same_round(tmp_path, flower_identity):
    """A site that sent nothing back within the timeout (lost, or still training) would
    make the round wait for it a second time; one that answered, even with an error, is
    asked as usual, and the silent one is asked again in the next round."""
    strategy, scheme, recorder = _strategy(tmp_path, "ffa", min_train=1)
    notes = []
    recorder.note = lambda r, text: notes.append((r, text))
    nodes = [100, 101, 102]
    _, g = _start_round(strategy, scheme, 1, nodes=nodes)
    refused = Message(Error(code=1000, reason="DataError: no rows"), reply_to=_instruction(101))
    strategy.aggregate_train(1, [_reply(100, trained(scheme, g, RANK, 0), 5, 0), refused])
    messages = strategy.configure_evaluate(1, to_record(g), ConfigRecord(), _Grid(nodes))
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 101]
    assert any(r == 1 and "node 102 did not answer this round's training" in t for r, t in notes)

    _, g = _start_round(strategy, scheme, 2, nodes=nodes)
    strategy.aggregate_train(2, [_reply(n, trained(scheme, g, RANK, i), 5, i) for i, n in enumerate(nodes)])
    messages = strategy.configure_evaluate(2, to_record(g), ConfigRecord(), _Grid(nodes))
    assert sorted(m.metadata.dst_node_id for m in messages) == nodes
