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


def contains_answer(predictions: list[str], answers: list[str]) -> float:
    """Share of predictions that contain the answer (case-insensitive): generous to a
    model that explains, where exact match is not."""
    if not answers:
        return 0.0
    return sum(a.strip().lower() in p.lower() for p, a in zip(predictions, answers, strict=True)) / len(answers)


def macro_f1(predictions: list[str], golds: list[str]) -> float:
    """Unweighted mean of per-class F1 over every class seen in gold or predictions."""
    classes = set(golds) | set(predictions)
    if not classes:
        return 0.0
    total = 0.0
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(predictions, golds, strict=True))
        pred_c, gold_c = predictions.count(c), golds.count(c)
        total += 2 * tp / (pred_c + gold_c) if pred_c + gold_c else 0.0
    return total / len(classes)


@torch.no_grad()
def option_logprobs(model, prompt_ids: list[int], options: list[list[int]]) -> torch.Tensor:
    """log p(option | prompt) for each option, summed over its tokens, shape (n_options,).

    The prompt runs once; its KV cache is repeated for the options, which run as one
    right-padded batch (padding sits after every scored token, so causal attention never
    sees it). For 77 intent names after a 60-token prompt this is ~10x fewer tokens than
    scoring every prompt + option sequence in full."""
    if not options or any(len(o) == 0 for o in options):
        raise ValueError("every option needs at least one token")
    model.eval()
    prompt = torch.tensor([prompt_ids])
    out = model(input_ids=prompt, use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # the prompt's prediction of each option's first token
    n, width = len(options), max(len(o) for o in options)
    ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.bool)
    for i, o in enumerate(options):
        ids[i, :len(o)] = torch.tensor(o)
        mask[i, :len(o)] = True
    scores = first[ids[:, 0]]
    if width > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        attn = torch.ones((n, len(prompt_ids) + width - 1), dtype=torch.long)
        rest = model(input_ids=ids[:, :-1], attention_mask=attn, past_key_values=cache, use_cache=True).logits
        logp = torch.log_softmax(rest.float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        scores = scores + (logp * mask[:, 1:]).sum(dim=1)
    return scores
