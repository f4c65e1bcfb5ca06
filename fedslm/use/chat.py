"""Answer a question with a causal LM through its chat template."""

from __future__ import annotations

from pathlib import Path

import torch

from fedslm.data.tokenize import chat_prompt
from fedslm.device import autocast, model_device, to_device


class NotAModelError(FileNotFoundError):
    pass


@torch.no_grad()
def answer(model, tokenizer, question: str, max_new_tokens: int = 64, system_prompt: str | None = None,
           temperature: float = 0.0, top_p: float = 0.9, streamer=None) -> str:
    """Greedy (temperature 0) or sampled answer; `streamer` receives tokens as they come."""
    ids = tokenizer(chat_prompt(tokenizer, question, system_prompt), return_tensors="pt", add_special_tokens=False)
    model.eval()
    return _generate_ids(model, tokenizer, ids, max_new_tokens, temperature, top_p, streamer)


@torch.no_grad()
def _generate_ids(model, tokenizer, ids, max_new_tokens: int, temperature: float, top_p: float, streamer) -> str:
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    ids = to_device(dict(ids), model_device(model))
    with autocast(model):
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **sampling,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise NotAModelError(f"{path} is not a model directory (no config.json); give a directory written by "
                             "`fedslm export` or a run's model/ directory")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise NotAModelError(f"{path} has a config.json but no weights (*.safetensors); was the export interrupted? "
                             "Export it again")
    return path


def load_model_dir(model_dir: str | Path, device: str = "auto"):
    """(model, tokenizer) of a Hugging Face model directory, or NotAModelError saying why
    not, on `device` (auto: a GPU if there is one, in bf16 there)."""
    from fedslm.model import load_base_model

    return load_base_model(check_model_dir(model_dir), device, "auto")


def stream_answer(model_dir: str | Path, question: str, max_new_tokens: int = 128, temperature: float = 0.0,
                  top_p: float = 0.9, system_prompt: str | None = None) -> str:
    """`fedslm generate`: print the answer token by token as the model produces it."""
    from transformers import TextStreamer

    model, tok = load_model_dir(model_dir)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    return answer(model, tok, question, max_new_tokens, system_prompt, temperature, top_p, streamer=streamer)


def chat(model_dir: str | Path, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 0.9,
         system_prompt: str | None = None, read=input, write=print) -> list[dict]:
    """`fedslm chat`: a multi-turn conversation; the whole history goes through the chat
    template each turn. An empty line, /exit or end of input ends it; /reset forgets."""
    from transformers import TextStreamer

    model, tok = load_model_dir(model_dir)
    model.eval()
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    start = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history = list(start)
    write(f"chatting with {model_dir} (empty line or /exit to quit, /reset to start over)")
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            break
        if line in ("", "/exit", "/quit"):
            break
        if line == "/reset":
            history = list(start)
            continue
        history.append({"role": "user", "content": line})
        text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        reply = _generate_ids(model, tok, ids, max_new_tokens, temperature, top_p, streamer)
        history.append({"role": "assistant", "content": reply})
    return history


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], system_prompt: str | None = None,
                   max_new_tokens: int = 12, batch_size: int = 16) -> list[str]:
    """Greedy completions of each prompt through the chat template, batched with left padding."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [chat_prompt(tokenizer, p, system_prompt) for p in prompts[i:i + batch_size]]
            enc = to_device(dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)),
                            model_device(model))
            with autocast(model):
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [o.strip() for o in out]
