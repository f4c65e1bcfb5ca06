"""The SLM families fedslm supports, each as a tiny random-weight model built here (no
downloads) with a byte-level tokenizer that carries the family's own chat template:
LoRA target resolution (fused projections included), exact per-sample gradients against
Opacus's hooks, exact FFA aggregation, merge parity, answer-only masking through the
family's template, and a private round from a model directory (`model.path=DIR`)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from opacus import GradSampleModule
from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from fedslm.config import LoraConfig, PrivacyConfig, TrainConfig
from fedslm.data.tokenize import TokenizedDataset, encode, make_collate
from fedslm.lora.adapter import adapter_state, attach_lora, load_adapter_state
from fedslm.lora.grad_sample import wrap_lora_for_dp
from fedslm.lora.schemes import SiteUpdate, make_scheme
from fedslm.lora.targets import TargetError, resolve_targets
from fedslm.losses import sequence_losses
from fedslm.model import load_base_model
from fedslm.privacy.accounting import PrivacyLedger
from fedslm.privacy.plan import plan_dp
from fedslm.train import DPContext, train_local
from tests.helpers import grad_samples, randomise_b

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, tie_word_embeddings=False)


@dataclasses.dataclass
class Family:
    name: str
    config: type
    model: type
    extra: dict
    specials: list[str]  # the first is bos, `eos` names the tokenizer's own end-of-text
    eos: str
    template: str
    turn_end: str  # what the template writes after an assistant's answer
    qv: list[str]  # what the DP default [q_proj, v_proj] resolves to
    n_all: int


def _template(user: str, assistant: str, end: str, bos: str = "") -> str:
    return (bos + "{% for m in messages %}" + user + "{{ m['content'] }}" + end + "{% endfor %}"
            "{% if add_generation_prompt %}" + assistant + "{% endif %}")


FAMILIES = [
    Family("llama", LlamaConfig, LlamaForCausalLM, {}, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"], "<|end_of_text|>",
           _template("<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n",
                     "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", "{{ bos_token }}"),
           "<|eot_id|>", ["q_proj", "v_proj"], 7),
    Family("qwen2", Qwen2Config, Qwen2ForCausalLM, {}, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>",
           _template("<|im_start|>{{ m['role'] }}\n", "<|im_start|>assistant\n", "<|im_end|>\n"),
           "<|im_end|>", ["q_proj", "v_proj"], 7),
    Family("phi3", Phi3Config, Phi3ForCausalLM, {}, ["<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"],
           "<|endoftext|>", _template("<|{{ m['role'] }}|>\n", "<|assistant|>\n", "<|end|>\n"),
           "<|end|>", ["qkv_proj"], 4),
    Family("gemma2", Gemma2Config, Gemma2ForCausalLM, {"head_dim": 8, "final_logit_softcapping": 3.0},
           ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<eos>",
           _template("<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n",
                     "<start_of_turn>model\n", "<end_of_turn>\n", "{{ bos_token }}"),
           "<end_of_turn>", ["q_proj", "v_proj"], 7),
]
IDS = [f.name for f in FAMILIES]


def family_tokenizer(f: Family):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(f.specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=f.specials[0], eos_token=f.eos, pad_token=f.eos,
                                  additional_special_tokens=[s for s in f.specials if s not in (f.specials[0], f.eos)])
    tok.chat_template = f.template
    return tok


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny model and tokenizer, saved as a Hugging Face directory."""
    out = {}
    for f in FAMILIES:
        tok = family_tokenizer(f)
        config = f.config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **SHAPE, **f.extra)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = f.model(config)
        path = tmp_path_factory.mktemp(f.name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[f.name] = path
    return out


def _load(saved, f: Family, dtype=torch.float32):
    model, tok = load_base_model(saved[f.name])
    return model.to(dtype), tok


def _examples(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}: how long should pill {i * 7} be taken?", "answer": f"Take it for {i + 2} days."}
            for i in range(n)]


def _batch(tok, n: int):
    ds = TokenizedDataset.from_records(tok, _examples(n), 256)
    return make_collate(tok.pad_token_id)([ds[i] for i in range(n)])


@pytest.mark.parametrize("f", FAMILIES, ids=IDS)
def test_targets_resolve_per_architecture(saved, f):
    model, _ = _load(saved, f)
    assert resolve_targets(model, ["q_proj", "v_proj"]) == f.qv
    every = resolve_targets(model, ["all"])
    assert len(every) == f.n_all
    assert set(resolve_targets(model, ["attention"])) | set(resolve_targets(model, ["mlp"])) == set(every)
    with pytest.raises(TargetError, match="is not a projection of this model") as err:
        resolve_targets(model, ["query_key_value"])
    assert every[0] in str(err.value)  # the error lists what the model has
    pm = attach_lora(model, LoraConfig(target_modules=["q_proj", "v_proj"]), freeze_a=True)
    adapted = {n.split(".")[-1] for n, m in pm.named_modules() if hasattr(m, "lora_B")}
    assert adapted == set(f.qv)


@pytest.mark.parametrize("f", FAMILIES, ids=IDS)
def test_answer_only_masking_through_the_family_template(saved, f):
    model, tok = _load(saved, f)
    assert tok.eos_token == f.turn_end  # training ends each answer where the template ends the turn
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids(f.turn_end)
    ex = _examples(1)[0]
    enc = encode(tok, ex, 256)
    answer = [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert tok.decode(answer) == ex["answer"] + f.turn_end
    prompt = tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if not m])
    assert ex["prompt"] in prompt and ex["answer"] not in prompt
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(
        [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["answer"]}],
        tokenize=False).rstrip("\n")
    # multi-turn chat data is masked turn by turn through the same template
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "bye"}, {"role": "assistant", "content": "Goodbye."}]}
    enc = encode(tok, chat, 256)
    target = tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m])
    assert target == "Hello." + f.turn_end + "Goodbye." + f.turn_end


@pytest.mark.parametrize("f", FAMILIES, ids=IDS)
def test_answer_loss_equals_the_models_own_forward(saved, f):
    """fedslm computes logits at answer positions only; they must be the model's logits
    (Gemma-2's soft cap included)."""
    model, tok = _load(saved, f, torch.float64)
    batch = _batch(tok, 3)
    ours = sequence_losses(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    mask = batch["loss_mask"][:, 1:].to(token.dtype)
    torch.testing.assert_close(ours.detach(), (token * mask).sum(1) / mask.sum(1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("f", FAMILIES, ids=IDS)
def test_per_sample_gradients_equal_opacus_hooks(saved, f):
    model, tok = _load(saved, f, torch.float64)
    pm = attach_lora(model, LoraConfig(target_modules=["all"]), freeze_a=False)
    randomise_b(pm, seed=1)
    batch = _batch(tok, 4)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # padding is exercised

    reference = grad_samples(copy.deepcopy(pm), batch, GradSampleModule)
    fast = grad_samples(copy.deepcopy(pm), batch, wrap_lora_for_dp)
    assert set(fast) == set(reference) and any(".lora_A." in n for n in fast)
    for name, ref in reference.items():
        torch.testing.assert_close(fast[name], ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("f", FAMILIES, ids=IDS)
def test_ffa_aggregate_is_the_mean_of_the_sites_updates(saved, f):
    model, _ = _load(saved, f)
    lora = LoraConfig(target_modules=["all"])
    pm = attach_lora(model, lora, freeze_a=True)
    scheme = make_scheme("ffa", adapter_state(pm, trainable_only=False), lora.r, lora.alpha)
    g = scheme.initial_global()

    def delta(tensors) -> dict[str, torch.Tensor]:
        load_adapter_state(pm, scheme.site_start(tensors, lora.r, None))
        return {n: m.get_delta_weight("default").detach().double().clone()
                for n, m in pm.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_B")}

    sites = []
    for seed, weight in ((1, 10.0), (2, 30.0), (3, 20.0)):
        randomise_b(pm, seed=seed)
        sites.append(SiteUpdate(adapter_state(pm), lora.r, weight))
    new, _ = scheme.combine(g, sites, "mean", 0.0)
    got = delta(new)
    want = {k: sum(delta(u.tensors)[k] * u.weight for u in sites) / 60.0 for k in got}
    assert any(k.endswith(f.qv[0]) for k in got)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("f", FAMILIES, ids=IDS)
def test_merge_parity(saved, f):
    model, tok = _load(saved, f)
    pm = attach_lora(model, LoraConfig(target_modules=["all"]), freeze_a=False)
    randomise_b(pm, std=0.2, seed=1)
    pm.eval()
    ids = _batch(tok, 2)["input_ids"]
    with torch.no_grad():
        adapted = pm(input_ids=ids).logits
        base_only = pm.get_base_model()
        merged = copy.deepcopy(pm).merge_and_unload()(input_ids=ids).logits
        with pm.disable_adapter():
            plain = base_only(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-4)


@pytest.mark.parametrize("f", FAMILIES, ids=IDS)
def test_a_private_round_on_a_model_directory(saved, f):
    """model.path=DIR of any family: load, attach the DP recipe's LoRA, one private round."""
    model, tok = load_base_model(saved[f.name])
    pm = attach_lora(model, LoraConfig(), freeze_a=True)
    data = TokenizedDataset.from_records(tok, _examples(24), 256)
    privacy = PrivacyConfig()
    train = TrainConfig(local_steps=2, batch_size=8, lr=0.05, progress=False)
    plan = plan_dp(privacy, train, len(data), rounds=1)
    before = adapter_state(pm)
    from fedslm.privacy.dp_step import wrap_for_dp

    stats = train_local(pm, data, train, tok.pad_token_id, seed=0, dp=DPContext(privacy, plan, PrivacyLedger([])),
                        grad_sample_module=wrap_for_dp(pm, privacy))
    assert stats.steps == 2 and stats.ledger.steps == 2
    assert 0 < stats.ledger.epsilon(privacy.delta, "prv") <= privacy.epsilon + 1e-6
    after = adapter_state(pm)
    assert set(after) == set(before) and all(".lora_B." in k for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_mixtures_of_experts_are_named_not_guessed():
    """A router is never a LoRA target, and `mlp`/`all` on a model whose experts are not
    plain linear layers is refused rather than quietly meaning attention only."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    small = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)
    qwen_moe = Qwen2MoeForCausalLM(Qwen2MoeConfig(**small, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                                  num_experts=2, num_experts_per_tok=1))
    every = resolve_targets(qwen_moe, ["all"])
    assert "shared_expert_gate" not in every and "gate" not in every and "gate_proj" in every
    mixtral = MixtralForCausalLM(MixtralConfig(**small, num_local_experts=2))
    assert resolve_targets(mixtral, ["attention"]) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(TargetError, match="no plain linear layers in an MLP block"):
        resolve_targets(mixtral, ["all"])
