"""The privacy audit: its statistics on known inputs, and DP vs non-DP on a tiny model."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from fedslm.privacy.audit import audit, auc_and_tpr, epsilon_lower_bound, exposure_bits, one_run_guesses
from fedslm.data.canaries import canary_examples, make_canaries
from simulations.inprocess import run_in_process


def test_exposure_bits():
    assert exposure_bits(0.1, [1.0] * 99) == pytest.approx(math.log2(100))  # ranked first
    assert exposure_bits(2.0, [1.0] * 99) == pytest.approx(0.0)  # ranked last
    assert exposure_bits(1.5, [1.0] * 49 + [2.0] * 50) == pytest.approx(math.log2(100) - math.log2(50))


def test_auc_and_tpr():
    assert auc_and_tpr([2.0, 3.0], [0.0, 1.0]) == (1.0, 1.0)
    assert auc_and_tpr([1.0, 1.0], [1.0, 1.0])[0] == 0.5
    members, nonmembers = [float(i) for i in range(100)], [float(i) + 0.5 for i in range(100)]
    auc, tpr = auc_and_tpr(members, nonmembers)
    assert auc == pytest.approx(0.495) and tpr == pytest.approx(0.01)


def test_one_run_epsilon_lower_bound():
    # 100 of 100 right: p^100 <= 0.05 rejects every p below 0.9705, i.e. eps < ln(p/(1-p))
    p = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(100, 100) == pytest.approx(math.log(p / (1 - p)), rel=1e-4)
    assert epsilon_lower_bound(50, 100) == 0.0
    assert 0 < epsilon_lower_bound(70, 100) < epsilon_lower_bound(90, 100)
    assert one_run_guesses([0.0, 1.0, 2.0, 3.0], [False, False, True, True]) == (2, 2)


def test_canaries_are_seeded_and_about_half_inserted():
    canaries = make_canaries(200, seed=3)
    assert canaries == make_canaries(200, seed=3) and canaries != make_canaries(200, seed=4)
    assert 70 < sum(c.inserted for c in canaries) < 130
    table = canary_examples(canaries, ["prompt", "answer"], repeats=2)
    assert len(table) == 2 * sum(c.inserted for c in canaries)
    assert table[0]["answer"].startswith("The access code is ")


def _audit_run(cfg, private: bool) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg.output_dir = str(Path(cfg.output_dir).parent / ("dp" if private else "nodp"))
    cfg.privacy.enabled = private
    cfg.privacy.max_noise_multiplier = 50.0
    run_in_process(cfg)
    canary_file = Path(cfg.output_dir) / "audit" / "site-0-canaries.json"
    assert canary_file.is_file()
    assert json.loads(canary_file.read_text())["site"] == 0
    return audit(Path(cfg.output_dir), candidates=63, echo=lambda *_: None)


def test_non_dp_run_exposes_canaries_that_dp_hides(tiny_cfg):
    """A non-DP run that overfits its small site memorises the planted secrets; the DP
    run with the same data, steps and seeds does not."""
    cfg = tiny_cfg
    cfg.federation.sites, cfg.federation.rounds = 1, 2
    cfg.train.local_steps, cfg.train.batch_size, cfg.train.lr = 40, 8, 0.02
    cfg.lora.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg.data.train_examples, cfg.data.eval_examples = 24, 16
    cfg.privacy.canaries, cfg.privacy.canary_repeats = 16, 2
    nodp, dp = _audit_run(cfg, private=False), _audit_run(cfg, private=True)
    assert nodp["canary_exposure_bits"] > dp["canary_exposure_bits"] + 1.0
    assert nodp["canary_exposure_bits"] > nodp["canary_exposure_bits_not_inserted"] + 1.0
    assert dp["epsilon_accountant"] <= 8.0 and dp["epsilon_lower_bound"] <= dp["epsilon_accountant"]
    written = json.loads((Path(cfg.output_dir).parent / "dp" / "audit.json").read_text())
    assert set(written) >= {"canary_exposure_bits", "mia_auc", "mia_tpr_at_1pct_fpr",
                            "epsilon_lower_bound", "epsilon_accountant"}


def test_audit_of_a_run_without_canaries_says_what_to_do(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "run_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="privacy.canaries=N"):
        audit(tmp_path)
