"""The frozen prefix (lora.layers=K): a record's cached bottom-layer output gives the same
losses, per-sample gradients and DP updates as the full forward, on Llama, Qwen2 and
Gemma-2 shapes, and the bottom layers do not run once cached."""

from __future__ import annotations

import copy
from pathlib import Path

import datasets
import pytest
import torch

from fedslm.config import LoraConfig, PrivacyConfig, TrainConfig
from fedslm.data.tokenize import TokenizedDataset, make_collate
from fedslm.lora.adapter import adapter_state, attach_lora
from fedslm.lora.frozen_prefix import CachedStates, first_trained_layer
from fedslm.losses import dataset_losses, sequence_losses
from fedslm.privacy.accounting import PrivacyLedger
from fedslm.privacy.dp_step import DPContext, wrap_for_dp
from fedslm.privacy.plan import plan_dp
from fedslm.train import train_local

PAD = 0


def _model(arch: str):
    from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if arch == "qwen2":  # alternating sliding/full layers: the mask is picked per layer index
        return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=6, max_window_layers=2,
                                            layer_types=["sliding_attention", "full_attention"] * 2))
    return Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, sliding_window=6, attn_implementation="eager"))


def _records(n: int = 10) -> TokenizedDataset:
    g = torch.Generator().manual_seed(1)
    ids, masks = [], []
    for i in range(n):
        length = 6 + (i * 5) % 11  # unequal lengths: padding in every batch, some past the sliding window
        ids.append(torch.randint(1, 61, (length,), generator=g).tolist())
        masks.append([0] * (length // 2) + [1] * (length - length // 2))
    return TokenizedDataset(datasets.Dataset.from_dict({"input_ids": ids, "loss_mask": masks}))


def _lora(model, layers=2):
    pm = attach_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], layers=layers),
                     freeze_a=True)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return pm


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_cached_prefix_gives_the_full_forwards_losses_and_per_sample_gradients(arch):
    pm = _lora(_model(arch))
    assert first_trained_layer(pm) == 2
    assert {n.split(".layers.")[1].split(".")[0] for n in adapter_state(pm)} == {"2", "3"}
    tokens = _records()
    cached = CachedStates.build(pm, tokens, PAD, batch_size=3)
    collate = make_collate(PAD)
    batch_full, batch_cached = collate([tokens[i] for i in range(10)]), collate([cached[i] for i in range(10)])
    pm.eval()
    torch.testing.assert_close(sequence_losses(pm, batch_cached), sequence_losses(pm, batch_full), rtol=0, atol=1e-5)

    # per-sample gradients of every trained B: each record's own loss, cached vs full
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    for i in range(0, 10, 3):
        grads = []
        for item in (tokens[i], cached[i]):
            pm.zero_grad()
            sequence_losses(pm, collate([item])).sum().backward()
            grads.append({n: p.grad.clone() for n, p in params.items()})
        for n in params:
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)

    # once cached, the frozen layers do not run
    layers = pm.get_base_model().get_decoder().layers
    calls = []
    hooks = [layers[i].register_forward_hook(lambda *_: calls.append(1)) for i in range(2)]
    dataset_losses(pm, cached, 4, PAD)
    assert not calls
    dataset_losses(pm, tokens, 4, PAD)
    assert len(calls) == 2 * 3  # two layers x three batches of the full forward
    for h in hooks:
        h.remove()
    assert all(type(layers[i]).__name__.endswith("DecoderLayer") for i in range(4))  # put back


@pytest.mark.parametrize("private", [False, True])
def test_training_on_the_cache_matches_training_on_the_records(private, reproducible_dp):
    """The same training (DP with fedslm's lora per-sample path and the same secret-draw
    stream, or plain) on cached states and on records ends at the same adapter."""
    base = _lora(_model("llama"))
    tokens = _records(12)
    train = TrainConfig(local_steps=4, batch_size=4, lr=0.05, progress=False)
    privacy = PrivacyConfig(epsilon=8.0, grad_sample_mode="lora")
    out = []
    for data in (tokens, CachedStates.build(base, tokens, PAD)):
        pm = copy.deepcopy(base)
        dp = gsm = None
        if private:
            plan = plan_dp(privacy, train, len(data), rounds=1)
            dp, gsm = DPContext(privacy, plan, PrivacyLedger()), wrap_for_dp(pm, privacy)
        torch.manual_seed(3)
        stats = train_local(pm, data, train, PAD, seed=3, dp=dp, grad_sample_module=gsm)
        assert stats.steps == 4
        out.append(adapter_state(pm))
    moved = max((out[0][k] - adapter_state(base)[k]).abs().max().item() for k in out[0])
    assert moved > 1e-3
    for k in out[0]:
        torch.testing.assert_close(out[1][k], out[0][k], rtol=1e-4, atol=1e-6)


def test_more_layers_than_the_model_has_is_refused():
    with pytest.raises(ValueError, match="lora.layers=9: this model has 4 decoder layers"):
        _lora(_model("llama"), layers=9)


def test_a_site_caches_each_split_on_its_first_use(tiny_cfg, flower_identity):
    """Through the site's handlers (tiny Llama, LoRA on its top layer): an evaluate
    message caches the held-out rows only, and scores them as the full forward does; a
    train message then caches the training rows once, and later rounds reuse both."""
    from test_messages import _context, _message

    from fedslm.site.evaluate import evaluate_loss
    from fedslm.site.handlers import handle_evaluate, handle_train
    from fedslm.site.runtime import PREFIX_CACHE_DIR, runtime_for, site_data

    tiny_cfg.lora.layers = 1
    ctx = _context(site=1)
    loss = handle_evaluate(_message(tiny_cfg, "evaluate"), ctx, tiny_cfg).content.metric_records["metrics"]["eval_loss"]
    rt = runtime_for(tiny_cfg)
    assert [k[-1] for k in rt.prefix_states] == ["eval"]
    plain = site_data(tiny_cfg, ctx, rt, False).eval
    full = evaluate_loss(rt.peft_model, plain, tiny_cfg.train.eval_batch_size, rt.tokenizer.pad_token_id)
    assert loss == pytest.approx(full, abs=1e-5)
    for r in (1, 2):
        reply = handle_train(_message(tiny_cfg, "train", server_round=r), ctx, tiny_cfg, progress=False)
        assert not reply.has_error()
    assert sorted(k[-1] for k in rt.prefix_states) == ["eval", "train"]
    # a simulated site shares them with the simulation's other processes, in the run dir
    shared = list((Path(tiny_cfg.output_dir) / PREFIX_CACHE_DIR).glob("*.safetensors"))
    assert len(shared) == 2


def test_states_saved_by_one_process_load_as_computed(tmp_path):
    """A simulation's processes share a site's states through one file: loading gives the
    same tensors, and a file of another split is refused rather than misread."""
    pm = _lora(_model("llama"))
    tokens = _records()
    cached = CachedStates.build(pm, tokens, PAD)
    cached.save(tmp_path / "s.safetensors")
    again = CachedStates.load(tmp_path / "s.safetensors", tokens)
    for i in range(len(tokens)):
        assert torch.equal(again[i][2], cached[i][2])
    with pytest.raises(ValueError, match="does not hold this split"):
        CachedStates.load(tmp_path / "s.safetensors", tokens.head(4))
