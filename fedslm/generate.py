"""Answer a question with a causal LM through its chat template."""

from __future__ import annotations

from pathlib import Path

import torch

from fedslm.data.tokenize import chat_prompt


class NotAModelError(FileNotFoundError):
    pass


@torch.no_grad()
def answer(model, tokenizer, question: str, max_new_tokens: int = 64, system_prompt: str | None = None,
           temperature: float = 0.0, top_p: float = 0.9, streamer=None) -> str:
    """Greedy (temperature 0) or sampled answer; `streamer` receives tokens as they come."""
    ids = tokenizer(chat_prompt(tokenizer, question, system_prompt), return_tensors="pt", add_special_tokens=False)
    model.eval()
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    out = model.generate(
        **ids,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **sampling,
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def load_model_dir(model_dir: str | Path):
    """(model, tokenizer) of a Hugging Face model directory, or NotAModelError saying why not."""
    from fedslm.model import load_base_model

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise NotAModelError(f"{path} is not a model directory (no config.json); give a directory written by "
                             "`fedslm export` or a run's model/ directory")
    return load_base_model(path)


def stream_answer(model_dir: str | Path, question: str, max_new_tokens: int = 128, temperature: float = 0.0,
                  top_p: float = 0.9, system_prompt: str | None = None) -> str:
    """`fedslm generate`: print the answer token by token as the model produces it."""
    from transformers import TextStreamer

    model, tok = load_model_dir(model_dir)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    return answer(model, tok, question, max_new_tokens, system_prompt, temperature, top_p, streamer=streamer)
