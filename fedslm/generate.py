"""Answer a question with a causal LM through its chat template."""

from __future__ import annotations

import torch

from fedslm.data.tokenize import chat_prompt


@torch.no_grad()
def answer(model, tokenizer, question: str, max_new_tokens: int = 64, system_prompt: str | None = None) -> str:
    ids = tokenizer(chat_prompt(tokenizer, question, system_prompt), return_tensors="pt", add_special_tokens=False)
    model.eval()
    out = model.generate(
        **ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
