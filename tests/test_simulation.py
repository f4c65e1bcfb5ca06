"""A whole federation through Flower's simulation engine with a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedslm.simulation import simulate
from fedslm.transport import record_bytes, to_record

REQUIRED = {"rounds", "sites", "strategy", "eval_loss_initial", "eval_loss_final", "epsilon", "delta",
            "target_epsilon", "bytes_up", "bytes_down", "seconds"}


@pytest.mark.slow
def test_three_sites_two_rounds_end_to_end(tiny_cfg):
    tiny_cfg.federation.sites = 3
    tiny_cfg.federation.rounds = 2
    tiny_cfg.federation.ray_cpus = 2
    tiny_cfg.train.threads = 1
    summary = simulate(tiny_cfg, echo=lambda *_: None)
    run = Path(tiny_cfg.output_dir)

    on_disk = json.loads((run / "summary.json").read_text())
    assert REQUIRED <= set(on_disk)
    assert on_disk["rounds"] == 2 and on_disk["sites"] == 3 and on_disk["strategy"] == "ffa"
    assert 0 < on_disk["epsilon"] <= tiny_cfg.privacy.epsilon
    assert on_disk["eval_loss_final"] < on_disk["eval_loss_initial"]
    assert summary["federation_seconds"] > 0

    # bytes on the wire: B matrices only, fp32, once per site per message
    r1 = load_file(str(run / "adapters" / "round_001.safetensors"))
    adapter_bytes = record_bytes(to_record(r1))
    assert sum(t.numel() * 4 for t in r1.values()) <= adapter_bytes <= sum(t.numel() * 4 + 256 for t in r1.values())
    assert on_disk["bytes_up"] == 2 * 3 * adapter_bytes
    assert on_disk["bytes_down"] == (3 + 2 * 2 * 3) * adapter_bytes  # round-0 eval, then train+eval

    r2 = load_file(str(run / "adapters" / "round_002.safetensors"))
    assert all(k.endswith("lora_B.weight") for k in r2)
    assert any(t.abs().max() > 0 for t in r2.values())  # the global adapter moved from zero
    assert any(not torch.equal(r1[k], r2[k]) for k in r1)

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 and {(r["round"], r["site"]) for r in rows} == {(r, s) for r in (1, 2) for s in range(3)}
    assert (run / "curves.png").stat().st_size > 1000
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["level"] == "sample" and set(privacy["epsilon_per_site"]) == {"0", "1", "2"}

    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.eos_token_id == model.config.pad_token_id
