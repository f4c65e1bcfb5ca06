"""Scores of held-out answers: option log-likelihoods, exact match, contains-answer, macro-F1."""

from __future__ import annotations

import torch


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
