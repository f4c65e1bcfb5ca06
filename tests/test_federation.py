"""Whole federations (round 0, rounds, outputs) with the real server run and the real
ClientApp, the sites answering in this process through tests/inprocess.py instead of Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedslm.data.sites import site_table
from simulations.inprocess import run_in_process


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _file_cfg(cfg, path: Path, sites: int):
    cfg.data.path = str(path)
    cfg.data.prompt_columns = ["question"]
    cfg.data.partitioner = "natural"
    cfg.data.partition_by = "source"
    cfg.data.eval_fraction = 0.2
    cfg.federation.sites = sites
    cfg.federation.rounds = 2
    return cfg


def test_a_bad_site_fails_alone(tiny_cfg, tmp_path, capsys):
    """Site C has 3 rows, fewer than the DP batch: it is refused with its reason, and the
    federation goes on with the other two (min_sites=2)."""
    rows = [{"question": f"q{i}?", "answer": f"a{i}.", "source": s} for s, n in (("A", 30), ("B", 30), ("C", 3))
            for i in range(n)]
    cfg = _file_cfg(tiny_cfg, _jsonl(tmp_path / "sites.jsonl", rows), sites=3)
    cfg.federation.min_sites = 2
    summary = run_in_process(cfg, echo=print)
    assert summary["rounds"] == 2
    rejected = [r for per_round in summary["rejected"].values() for r in per_round]
    assert len(rejected) == 2 and all("site 2" in r and "fewer than train.batch_size=4" in r for r in rejected)
    assert "rejected site 2: site error: DataError: site 2 has 2 training examples" in capsys.readouterr().out
    rows_out = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert {r["site"] for r in rows_out if r["epsilon"] is not None} == {0, 1}
    assert [r["natural_id"] for r in site_table(cfg.data, 3)] == ["A", "B", "C"]


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "medquad" / "medquad.jsonl").exists(), reason="../shared/data not present")
def test_real_medquad_slice_natural_partition(tiny_cfg, tmp_path):
    wanted = {"CDC": 0, "NHLBI": 0, "NINDS": 0}
    rows = []
    with (SHARED / "medquad" / "medquad.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["source"] in wanted and wanted[row["source"]] < 25:
                wanted[row["source"]] += 1
                rows.append(row)
    cfg = _file_cfg(tiny_cfg, _jsonl(tmp_path / "slice.jsonl", rows), sites=3)
    summary = run_in_process(cfg)
    assert summary["rounds"] == 2 and summary["sites"] == 3 and not summary["rejected"]
    table = site_table(cfg.data, 3)
    assert sorted(r["natural_id"] for r in table) == ["CDC", "NHLBI", "NINDS"]
    assert all(r["train"] == 20 and r["eval"] == 5 for r in table)


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_client_level_dp_wraps_the_strategy(tiny_cfg, clipping):
    """Flower's server-side DP wrapper clips each site's update and noises the aggregate;
    its site-level epsilon is reported separately from the sample-level one."""
    import numpy as np

    from fedslm.privacy.accounting import RDP_ALPHAS

    tiny_cfg.privacy.client_level = True
    tiny_cfg.privacy.client_clipping = clipping
    tiny_cfg.privacy.client_noise_multiplier = 2.0
    tiny_cfg.privacy.client_clip_norm = 0.01
    summary = run_in_process(tiny_cfg)
    run = Path(tiny_cfg.output_dir)
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["level"] == "sample+client"
    # every site every round: `rounds` Gaussian mechanisms of sensitivity C and std sigma*C,
    # RDP alpha/(2 sigma^2) each, converted to (eps, delta) with Balle et al.'s (2020) bound
    alphas = np.array(RDP_ALPHAS, dtype=float)
    rdp = tiny_cfg.federation.rounds * alphas / (2 * 2.0**2)
    delta = tiny_cfg.privacy.delta
    expected = float(np.min(rdp - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)))
    assert privacy["client_level"]["epsilon"] == pytest.approx(expected, rel=1e-9) == summary["client_level_epsilon"]
    assert 0 < privacy["epsilon_per_site"]["0"] <= tiny_cfg.privacy.epsilon
    # the noise on the aggregate (std 2.0 * 0.01 / 3 per value) dominates a clipped mean of norm <= 0.01
    r1 = load_file(str(run / "adapters" / "round_001.safetensors"))
    values = torch.cat([t.flatten() for k, t in r1.items() if ".lora_B." in k])
    # adaptive clipping spends part of the budget on the clipped count (std 2.0 here), so the
    # update's own noise multiplier is (2.0^-2 - (2 * 2.0)^-2)^-1/2 (Andrew et al. 2021)
    sigma = 2.0 if clipping == "fixed" else (2.0**-2 - 4.0**-2) ** -0.5
    ratio = values.std().item() / (sigma * 0.01 / 3)
    if clipping == "fixed":
        assert ratio == pytest.approx(1.0, rel=0.15)
    else:
        # Flower moves the clip norm before noising, by exp(-0.2 (f - 0.5)) with f the noisy
        # unclipped fraction (std 2.0 / 3 sites): within 4.5 standard deviations of that
        assert 0.55 < ratio < 1.8
    assert "Site-level DP" in (run / "model" / "README.md").read_text()


@pytest.mark.parametrize("strategy", ["exact", "stack"])
def test_heterogeneous_ranks_end_to_end(tiny_cfg, strategy):
    """Sites of ranks 4, 2 and 4 under a global rank of 4: every round aggregates all three,
    the error is the truncation (exact) or ~0 (stack), and the exported model loads."""
    tiny_cfg.federation.sites, tiny_cfg.federation.rounds = 3, 2
    tiny_cfg.lora.r, tiny_cfg.lora.site_ranks = 4, [4, 2, 4]
    tiny_cfg.strategy.name = strategy
    # Without DP: the subject is the rank layout, and "the model learned" must not hang on
    # secret noise over 48 rows (it did not, one CI run in a few).
    tiny_cfg.privacy.enabled = False
    summary = run_in_process(tiny_cfg)
    run = Path(tiny_cfg.output_dir)
    assert summary["rounds"] == 2 and not summary["rejected"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {(r["site"], r["lora_r"]) for r in rows} == {(0, 4), (1, 2), (2, 4)}
    errors = summary["aggregation_error_per_round"]
    if strategy == "stack":
        assert max(errors) < 1e-6
        assert summary["global_rank"] == 2 * (4 + 2 + 4)  # the stack grows by the site ranks each round
    else:
        assert 0 < min(errors) and max(errors) < 1 and summary["global_rank"] == 4
    # the uplink follows each site's rank: 4 + 2 + 4 = 10 rank units, not 3 x 4
    r1 = load_file(str(run / "adapters" / "round_001.safetensors"))
    size = 2 if tiny_cfg.federation.transport_dtype == "float16" else 4
    per_rank_unit = sum(t.shape[0] if ".lora_B." in k else t.shape[1] for k, t in r1.items()) * size
    assert 10 * per_rank_unit <= summary["bytes_up_per_round"][0] < 10 * per_rank_unit + 256 * len(r1) * 3
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.vocab_size > 0


def test_client_level_epsilon_takes_no_sampling_credit_and_counts_the_replies_averaged():
    """The coordinator samples sites from a public seed, so no amplification; a round whose
    mean was over m < k replies had noise multiplier z*m/k. By hand: the RDP of a Gaussian
    mechanism of multiplier s at order a is a / (2 s^2), summed over rounds, converted to
    epsilon with Balle et al. (2020) as Opacus does, minimised over the same orders."""
    import numpy as np

    from fedslm.privacy.accounting import RDP_ALPHAS
    from fedslm.privacy.client_level import client_level_epsilon

    def by_hand(z: float, k: int, averaged: list[int], delta: float) -> float:
        a = np.array(RDP_ALPHAS, dtype=float)
        rdp = sum(a / (2 * (z * m / k) ** 2) for m in averaged)
        eps = rdp + np.log1p(-1 / a) - (np.log(delta) + np.log(a)) / (a - 1)
        return float(np.nanmin(eps))

    full = client_level_epsilon(2.0, 4, [4, 4, 4], 1e-5)
    assert full == pytest.approx(by_hand(2.0, 4, [4, 4, 4], 1e-5), rel=1e-9)
    short = client_level_epsilon(2.0, 4, [4, 2, 4], 1e-5)
    assert short == pytest.approx(by_hand(2.0, 4, [4, 2, 4], 1e-5), rel=1e-9) and short > full
    # sampling 4 of 100 sites earns nothing: the same as if every site took part
    assert client_level_epsilon(2.0, 4, [4], 1e-5) == pytest.approx(by_hand(2.0, 1, [1], 1e-5), rel=1e-9)


def test_with_client_level_dp_a_refusing_site_does_not_stall_the_run(tiny_cfg, tmp_path):
    """Flower's DP wrapper skips a round with any error reply; fedslm takes error replies out
    first, so the others are aggregated every round, the refusal is recorded, and the
    round's epsilon is accounted over the two replies actually averaged (z * 2/3)."""
    from fedslm.privacy.client_level import client_level_epsilon

    rows = [{"question": f"q{i}?", "answer": f"a{i}.", "source": s} for s, n in (("A", 30), ("B", 30), ("C", 3))
            for i in range(n)]
    cfg = _file_cfg(tiny_cfg, _jsonl(tmp_path / "sites.jsonl", rows), sites=3)
    cfg.federation.min_sites = 2
    cfg.privacy.client_level = True
    cfg.privacy.client_noise_multiplier = 2.0
    summary = run_in_process(cfg)
    assert summary["rounds"] == 2
    rejected = [r for per_round in summary["rejected"].values() for r in per_round]
    assert len(rejected) == 2 and all("site 2" in r and "DataError" in r for r in rejected)
    run = Path(cfg.output_dir)
    r1, r2 = (load_file(str(run / "adapters" / f"round_00{i}.safetensors")) for i in (1, 2))
    assert any(not torch.equal(r1[k], r2[k]) for k in r1 if ".lora_B." in k)  # round 2 was aggregated too
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["client_level"]["replies_averaged_per_round"] == [2, 2]
    assert privacy["client_level"]["epsilon"] == pytest.approx(client_level_epsilon(2.0, 3, [2, 2], cfg.privacy.delta))
    assert privacy["client_level"]["epsilon"] > client_level_epsilon(2.0, 3, [3, 3], cfg.privacy.delta)


def test_a_site_with_a_spent_budget_is_marked_exhausted_behind_the_dp_wrapper(tiny_cfg, tmp_path, flower_identity):
    from flwr.app import Error, Message, RecordDict

    from fedslm.server.strategy import SiteErrorsFirst

    class Wrapper:
        def __init__(self):
            self.seen = None

        def aggregate_train(self, server_round, replies):
            self.seen = list(replies)
            return "aggregated", None

    class Core:
        min_train_nodes = 1
        exhausted: set = set()
        heard: set = set()

        def heard_from(self, server_round, replies):
            self.heard |= {m.metadata.src_node_id for m in replies}

        def too_few(self, server_round, valid):
            return valid < self.min_train_nodes

        def site_error(self, server_round, msg):
            if msg.error.reason.startswith("BudgetExceededError"):
                self.exhausted.add(msg.metadata.src_node_id)

        def reply_problem(self, msg):  # node 4 sends arrays Flower's clipping would choke on
            return "shape (9, 9), expected (4, 8)" if msg.metadata.src_node_id == 4 else None

        class recorder:
            rejected_log: list = []

            @classmethod
            def rejected(cls, server_round, node, reason):
                cls.rejected_log.append((node, reason))

    def reply(node: int, error: str | None = None) -> Message:
        request = Message(RecordDict(), dst_node_id=node, message_type="train")
        return Message(Error(code=1000, reason=error), reply_to=request) if error else Message(RecordDict(), reply_to=request)

    wrapper, core = Wrapper(), Core()
    out = SiteErrorsFirst(wrapper, core).aggregate_train(
        3, [reply(1), reply(2, "BudgetExceededError: spent"), reply(3), reply(4)])
    assert out == ("aggregated", None) and core.exhausted == {2}
    # every site that answered, with an error or a bad update too, is asked to evaluate
    assert core.heard == {1, 2, 3, 4}
    # a malformed update is rejected before Flower's DP wrapper ever sees it
    assert [m.metadata.src_node_id for m in wrapper.seen] == [1, 3]
    assert core.recorder.rejected_log == [(4, "invalid update: shape (9, 9), expected (4, 8)")]


def test_a_site_lost_for_good_does_not_stall_the_run_with_the_default_min_sites(tiny_cfg, capsys):
    """min_sites=0 waits for every site; one never connects. Each round waits at most
    federation.timeout_s for it, goes on with the others, and (fewer than min_sites valid
    replies) keeps the global adapter: the run ends instead of waiting forever."""
    import time

    from simulations.inprocess import FIRST_NODE_ID, InProcessGrid

    tiny_cfg.federation.sites, tiny_cfg.federation.min_sites = 3, 0
    tiny_cfg.federation.timeout_s = 1.0
    grid = InProcessGrid(tiny_cfg)
    grid.offline = {FIRST_NODE_ID}  # site 0
    started = time.monotonic()
    summary = run_in_process(tiny_cfg, echo=print, grid=grid)
    assert summary["rounds"] == 2 and time.monotonic() - started < 120
    out = capsys.readouterr().out
    assert out.count("2 of the 3 sites waited for are online after 1s") >= 2
    assert "only 2 valid replies (< min 3); global adapter unchanged" in out
    assert {node for _, node in grid.delivered} == {FIRST_NODE_ID + 17, FIRST_NODE_ID + 34}


def test_evaluation_cadence_and_row_limit(tiny_cfg, tmp_path):
    """eval_every=2 over 3 rounds: held-out losses after rounds 0, 2 and 3 only; round 2
    scores the first 2 rows (its loss differs from a full pass), rounds 0 and 3 every row."""
    tiny_cfg.federation.sites, tiny_cfg.federation.rounds = 2, 3
    tiny_cfg.federation.eval_every = 2
    tiny_cfg.privacy.enabled = False  # the two runs below must train identically
    curves = {}
    for limit in (2, 0):
        tiny_cfg.federation.eval_limit = limit
        tiny_cfg.output_dir = str(tmp_path / f"limit-{limit}")
        summary = run_in_process(tiny_cfg)
        assert summary["rounds"] == 3
        # each round's training phase is timed apart from its evaluation, and is part of it
        assert all(0 < t <= s for t, s in zip(summary["train_seconds_per_round"], summary["seconds_per_round"],
                                              strict=True))
        curves[limit] = {int(s): {int(r): v for r, v in c.items()} for s, c in summary["eval_loss_per_site"].items()}
    for site in (0, 1):
        limited, full = curves[2][site], curves[0][site]
        assert sorted(limited) == sorted(full) == [0, 2, 3]
        assert limited[0] == pytest.approx(full[0]) and limited[3] == pytest.approx(full[3])
        assert limited[2] != pytest.approx(full[2], abs=1e-6)
