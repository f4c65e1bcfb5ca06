"""The public warm start: the server trains the starting adapter on public data before any
private round; no site spends anything for it, and privacy.json and the card say so."""

from __future__ import annotations

import json

import pytest

from fedslm.data.clinic import generate_site
from fedslm.server.warm_start import public_examples
from simulations.inprocess import run_in_process


def _site_epsilons(run_dir) -> dict:
    privacy = json.loads((run_dir / "privacy.json").read_text())
    return privacy, {s: round(e, 9) for s, e in privacy["epsilon_per_site"].items()}


def test_warm_start_trains_the_start_on_public_data_at_no_privacy_cost(tiny_cfg, tmp_path):
    public = tmp_path / "public.jsonl"
    # public rows in the task's form: the clinic's style, from another seed than any site's
    public.write_text("\n".join(json.dumps(r) for r in generate_site(9, 40, seed=99)))
    tiny_cfg.federation.sites, tiny_cfg.federation.rounds = 2, 1
    tiny_cfg.export_model = True
    runs = {}
    for warm in (None, str(public)):
        tiny_cfg.warm_start.data = warm
        tiny_cfg.warm_start.lr, tiny_cfg.warm_start.epochs = 0.05, 3.0
        tiny_cfg.output_dir = str(tmp_path / ("warm" if warm else "cold"))
        lines = []
        summary = run_in_process(tiny_cfg, echo=lines.append)
        runs[bool(warm)] = (summary, lines, tmp_path / ("warm" if warm else "cold"))

    cold, warm = runs[False], runs[True]
    # the starting point moved: round 0's held-out loss (every site scores the start) fell
    start = {b: sum(c[0] for c in r[0]["eval_loss_per_site"].values()) for b, r in runs.items()}
    assert start[True] < start[False] - 0.05
    assert any(line.startswith("round 0 (warm start on public data)") for line in warm[1])
    assert any("warm start on public data" in line and "no privacy spent" in line for line in warm[1])

    # the sites spent exactly what they spend without it: same calibration, same ledgers
    (p_cold, eps_cold), (p_warm, eps_warm) = _site_epsilons(cold[2]), _site_epsilons(warm[2])
    assert eps_warm == eps_cold and all(e > 0 for e in eps_warm.values())
    assert "warm_start" not in p_cold
    ws = p_warm["warm_start"]
    assert ws["epsilon"] == 0.0 and ws["public"] is True and ws["rows"] == 40 and ws["steps"] > 0
    card = (warm[2] / "model" / "README.md").read_text()
    assert "public data only" in card and "spent no privacy budget (epsilon 0)" in card
    assert "public data" not in (cold[2] / "model" / "README.md").read_text()


def test_label_set_warm_start_and_its_refusals(tiny_cfg, tmp_path):
    labels = ["card_arrival", "lost_or_stolen_card", "top_up_failed"]
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    tiny_cfg.data.shape, tiny_cfg.data.labels_path = "classification", str(tmp_path / "labels.json")
    tiny_cfg.data.instruction, tiny_cfg.warm_start.data = "Which intent?", "labels"
    examples, _, described = public_examples(tiny_cfg)
    assert [e["answer"] for e in examples] == labels
    assert examples[1]["prompt"] == "Which intent?\n\nlost or stolen card" and "3 names" in described
    from fedslm.data.errors import DataError

    tiny_cfg.data.shape = "instruction"
    with pytest.raises(DataError, match="warm_start.data=labels needs a classification"):
        public_examples(tiny_cfg)
    from fedslm.config import ConfigError, validate

    tiny_cfg.data.shape, tiny_cfg.strategy.name = "classification", "stack"
    with pytest.raises(ConfigError, match="warm_start.data: strategy stack"):
        validate(tiny_cfg)
