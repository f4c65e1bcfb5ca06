"""benchmarks/gpu_check.py, the script a GPU runs once, at its CPU smoke size: every part
runs (or says why it cannot) and the JSON and the headline line are what the README reads."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_check


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke size; a GPU runs the full check")
def test_the_gpu_check_runs_on_the_cpu_at_a_small_size(tmp_path, capsys, monkeypatch):
    """As on a lent GPU machine, which has no Ray (its wheel is more than a call carries):
    the federation part runs its sites in-process."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    out = tmp_path / "gpu_check.json"
    result = gpu_check.main(["--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    tp = result["parts"]["throughput"]
    assert set(tp["variants"]) == {"lora", "dp-hooks", "dp-lora"} and tp["reference"] == "lora"
    assert all(v["tokens_per_s"] > 0 for v in tp["variants"].values())
    fed = result["parts"]["federation"]
    assert fed["sites"] == 2 and len(fed["seconds_per_round"]) == fed["rounds"] == 1
    assert fed["engine"].startswith("in-process (no Ray on this machine)")
    assert 0 < fed["epsilon"] <= 8.0
    assert "model.quantize=4bit needs a CUDA GPU" in result["parts"]["qlora"]["skipped"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"dp/non-dp throughput ratio: {tp['dp_over_non_dp_tokens']:.2f}"
