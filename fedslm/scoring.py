"""Held-out answers from a model: batched greedy generation and exact-match accuracy."""

from __future__ import annotations

import torch

from fedslm.data.tokenize import chat_prompt


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
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [o.strip() for o in out]


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """Share of predictions equal to the answer, ignoring case and surrounding space."""
    if not answers:
        return 0.0
    return sum(p.strip().lower() == a.strip().lower() for p, a in zip(predictions, answers, strict=True)) / len(answers)
