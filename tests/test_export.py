"""The merged model is the adapted model: same logits, loadable with plain transformers."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from fedslm.lora.adapter import adapter_state, attach_lora
from fedslm.data.tokenize import chat_prompt
from fedslm.use.export import build_adapted, export_merged
from fedslm.model import load_base_model, resolve_model_dir


def test_merged_model_matches_base_plus_adapter(tiny_cfg, tmp_path):
    model_dir = resolve_model_dir(tiny_cfg.model)
    base, tok = load_base_model(model_dir)
    pm = attach_lora(base, tiny_cfg.lora, freeze_a=True)
    torch.manual_seed(0)
    # the peft view of an FFA global: the seed's A, a trained B
    tensors = {k: v if ".lora_A." in k else torch.randn_like(v) * 0.05
               for k, v in adapter_state(pm, trainable_only=False).items()}
    rank, alpha = tiny_cfg.lora.r, tiny_cfg.lora.alpha
    privacy = {"level": "sample", "epsilon_per_site": {"0": 7.5}, "delta": 1e-5, "target_epsilon": 8.0,
               "rounds": 3, "sites": 3, "accountant": "rdp", "max_grad_norm": 1.0,
               "noise_multiplier_per_site": {"0": 0.5}}
    prompts = ["Is this the flu?", "My ankle is swollen."]
    info = export_merged(model_dir, tiny_cfg, tensors, rank, alpha, tmp_path / "model", prompts, privacy)
    print(f"merge max |logit diff| = {info['merge_max_abs_diff']:.3e}")
    assert info["merge_max_abs_diff"] < 1e-5

    # independent check: plain transformers load vs the unmerged adapter model
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    adapted, _ = build_adapted(model_dir, tiny_cfg, tensors, rank, alpha)
    plain, _ = load_base_model(model_dir)
    ids = tok(chat_prompt(tok, "What helps with acne?"), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        a, m, p = adapted(input_ids=ids).logits, merged(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (a - m).abs().max() < 1e-5
    assert (a - p).abs().max() > 1e-3  # the adapter really changed the model

    card = (tmp_path / "model" / "README.md").read_text()
    assert "(7.50, 1e-05)-DP" in card and "does not" in card
    assert json.loads((tmp_path / "model" / "privacy.json").read_text())["delta"] == 1e-5
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def _run_dir(tiny_cfg, tmp_path):
    """What a finished federation leaves behind: its config and a round's global adapter."""
    from fedslm.rundir import adapter_path, save_adapter
    from fedslm.config import to_run_config

    run = tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "run_config.json").write_text(json.dumps(to_run_config(tiny_cfg)))
    base, _ = load_base_model(resolve_model_dir(tiny_cfg.model))
    torch.manual_seed(1)
    tensors = {k: v if ".lora_A." in k else torch.randn_like(v) * 0.05
               for k, v in adapter_state(attach_lora(base, tiny_cfg.lora, freeze_a=True), trainable_only=False).items()}
    save_adapter(adapter_path(run, 2), tensors, {"rank": str(tiny_cfg.lora.r), "alpha": str(tiny_cfg.lora.alpha)})
    return run, tensors


def test_export_command_writes_a_standalone_half_precision_model(tiny_cfg, tmp_path, capsys):
    from fedslm.cli import main

    run, tensors = _run_dir(tiny_cfg, tmp_path)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out), "--dtype", "fp16"]) == 0
    assert "round_002" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert next(merged.parameters()).dtype == torch.float16
    assert (out / "adapter" / "adapter_config.json").is_file() and "Weights stored as fp16" in (out / "README.md").read_text()
    model_dir = resolve_model_dir(tiny_cfg.model)
    adapted, tok = build_adapted(model_dir, tiny_cfg, tensors, tiny_cfg.lora.r, tiny_cfg.lora.alpha)
    ids = tok(chat_prompt(tok, "Is this the flu?"), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        diff = (adapted(input_ids=ids).logits - merged(input_ids=ids).logits.float()).abs().max()
    assert diff < 0.05


def test_export_command_names_what_is_wrong(tiny_cfg, tmp_path, capsys):
    from fedslm.cli import main

    assert main(["export", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a fedslm run directory" in capsys.readouterr().err
    run, _ = _run_dir(tiny_cfg, tmp_path)
    assert main(["export", str(run), "--out", str(tmp_path / "o"), "--round", "7"]) == 2
    assert "no global adapter for round 7" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_generate_streams_an_answer_and_refuses_a_non_model(tiny_cfg, tmp_path, capsys):
    from fedslm.cli import main
    from fedslm.use.chat import stream_answer

    text = stream_answer(resolve_model_dir(tiny_cfg.model), "Hello?", max_new_tokens=6)
    assert capsys.readouterr().out.strip() == text  # what streamed is the answer returned
    sampled = stream_answer(resolve_model_dir(tiny_cfg.model), "Hello?", max_new_tokens=6, temperature=0.8)
    assert isinstance(sampled, str)
    assert main(["generate", str(tmp_path), "Hello?"]) == 2
    assert "is not a model directory" in capsys.readouterr().err


def test_int8_copy_loads_runs_and_is_measured_against_fp16(tiny_cfg, tmp_path, capsys):
    from fedslm.cli import main

    tiny_cfg.model.tiny.hidden_size = 128  # int8 pays off when linear weights dominate
    tiny_cfg.model.tiny.intermediate_size = 512
    run, _ = _run_dir(tiny_cfg, tmp_path)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out), "--int8"]) == 0
    printed = capsys.readouterr().out
    assert "int8 copy in" in printed and "held-out answer loss" in printed

    q = AutoModelForCausalLM.from_pretrained(out / "int8")  # plain transformers (+ torchao) load
    assert "Int8" in type(q.model.layers[0].mlp.up_proj.weight).__name__
    fp = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 40, 41, 42, 7]])
    with torch.no_grad():
        diff = (q(input_ids=ids).logits - fp(input_ids=ids).logits).abs().max().item()
    assert 0 < diff < 0.1  # quantised, and close
    assert sum(p.stat().st_size for p in (out / "int8").glob("*.safetensors")) < \
        0.75 * sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert "## int8 copy" in (out / "README.md").read_text()
