"""A site's held-out evaluation: the mean answer loss of the global adapter on rows it
never trained on."""

from __future__ import annotations

from fedslm.data.tokenize import TokenizedDataset
from fedslm.losses import dataset_losses


def evaluate_loss(peft_model, dataset: TokenizedDataset, batch_size: int, pad_id: int) -> float:
    """Mean per-sequence answer loss over a held-out set (0.0 for an empty one)."""
    losses, _ = dataset_losses(peft_model, dataset, batch_size, pad_id)
    # summed batch by batch, as the figures in the README were measured
    return sum(chunk.sum().item() for chunk in losses.split(batch_size)) / max(len(losses), 1)
