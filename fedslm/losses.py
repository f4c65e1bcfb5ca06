"""The loss every part of fedslm trains and scores with: per-sequence mean cross-entropy
over answer tokens.

Each example contributes one per-sample loss, which is what per-sample clipping assumes
(HF's `labels=` loss averages over all tokens of the batch and would mix samples). Logits
are computed only at answer positions, because a full (batch x length x vocab) logit
tensor dominates memory for a 49k-token vocabulary.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader

from fedslm.data.tokenize import TokenizedDataset, make_collate
from fedslm.device import autocast, model_device, to_device
from fedslm.lora.frozen_prefix import replayed


def sequence_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sequence mean cross-entropy over answer tokens, shape (batch,). `model` is a
    peft model or a plain causal LM."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    batch = to_device(batch, model_device(model))
    with autocast(model):
        # with cached frozen-prefix states only the layers above the prefix run
        with replayed(model, batch["hidden"]) if "hidden" in batch else nullcontext():
            hidden = lm.get_decoder()(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state  # (B, T, d)
        # position t predicts token t+1; score only positions whose next token is answer
        target_mask = batch["loss_mask"][:, 1:].bool()
        rows, cols = target_mask.nonzero(as_tuple=True)
        logits = lm.get_output_embeddings()(hidden[rows, cols])  # (answer tokens, vocab)
    # the loss in fp32 at least (fp64 models, in tests, keep fp64)
    logits = soft_cap(lm, logits.to(torch.promote_types(logits.dtype, torch.float32)))
    targets = batch["input_ids"][:, 1:][rows, cols]
    token_loss = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    n = batch["input_ids"].shape[0]
    sums = torch.zeros(n, dtype=token_loss.dtype, device=token_loss.device).index_add(0, rows, token_loss)
    counts = target_mask.sum(dim=1).clamp(min=1)
    return sums / counts


def soft_cap(lm, logits: torch.Tensor) -> torch.Tensor:
    """Gemma-2's final-logit soft cap (cap * tanh(logits / cap)), which its own forward
    applies after the head: the loss computed here from the head must apply it too."""
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def dataset_losses(model, dataset: TokenizedDataset, batch_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every example's answer loss and its number of answer tokens, in dataset order:
    shapes (N,) and (N,). Held-out evaluation, perplexity and the audit all read this."""
    model.eval()
    losses, counts = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=make_collate(pad_id)):
        losses.append(sequence_losses(model, batch).cpu())
        counts.append(batch["loss_mask"][:, 1:].sum(dim=1))
    if not losses:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(losses), torch.cat(counts)
