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


def _head(model):
    """The decoder stack and a function from its final hidden states to next-token
    log-probabilities, so the vocabulary projection runs only where a score is read."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's LoRA-patched model
    head, cap = lm.get_output_embeddings(), getattr(lm.config, "final_logit_softcapping", None)

    def logprobs(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden).float()
        if cap:  # Gemma-2 caps its logits; the model's own forward does the same
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1)

    return lm.base_model, logprobs


@torch.no_grad()
def option_logprobs(model, prompt_ids: list[int], options: list[list[int]]) -> torch.Tensor:
    """log p(option | prompt) for each option, summed over its tokens, shape (n_options,).

    The prompt runs once; its KV cache is repeated for the options, which run as one
    right-padded batch (padding sits after every scored token, so causal attention never
    sees it). The vocabulary projection and log-softmax, which dominate with a 49k-token
    vocabulary, run only at the positions that predict a real option token, not at the
    padding."""
    if not options or any(len(o) == 0 for o in options):
        raise ValueError("every option needs at least one token")
    model.eval()
    decoder, logprobs = _head(model)
    out = decoder(input_ids=torch.tensor([prompt_ids]), use_cache=True)
    first = logprobs(out.last_hidden_state[0, -1:])[0]  # the prompt's prediction of each option's first token
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
        hidden = decoder(input_ids=ids[:, :-1], attention_mask=attn, past_key_values=cache).last_hidden_state
        real = mask[:, 1:]  # position j predicts option token j + 1
        picked = logprobs(hidden[real]).gather(-1, ids[:, 1:][real][:, None])[:, 0]
        rows = torch.arange(n)[:, None].expand(n, width - 1)[real]
        scores = scores + torch.zeros(n).index_add_(0, rows, picked)
    return scores
