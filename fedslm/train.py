"""The one training loop, DP or not: a site's local round, and the server's warm start on
public data (which is why it lives in the shared library, not in fedslm/site).

config -> site data -> [batch -> per-sequence answer loss -> (DP step) -> optimizer step
-> (FedProx pull)] x local steps -> the adapter the site sends back.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from fedslm.config import TrainConfig
from fedslm.data.tokenize import TokenizedDataset, make_collate
from fedslm.losses import sequence_losses
from fedslm.privacy.accounting import PrivacyLedger
from fedslm.privacy.dp_step import DPContext, PrivateStep, clear_grad_samples
from fedslm.privacy.randomness import DPRandomness


@dataclass
class TrainStats:
    steps: int
    empty_steps: int
    examples_seen: int
    mean_loss: float
    seconds: float
    ledger: PrivacyLedger | None = None


class ProximalPull:
    """FedProx: after every step, w <- w - lr * mu * (w - w_start). Applied after the
    (private) step, it never touches the data, so it adds nothing to the privacy cost, and
    Opacus's per-sample gradients (which would drop a loss-side proximal term) are not
    involved."""

    def __init__(self, params: list[torch.Tensor], lr: float, mu: float):
        self.params, self.factor = params, lr * mu
        self.anchors = [p.detach().clone() for p in params]

    @torch.no_grad()
    def __call__(self) -> None:
        for p, a in zip(self.params, self.anchors):
            p.sub_(self.factor * (p - a))


def train_local(
    peft_model,
    dataset: TokenizedDataset,
    cfg: TrainConfig,
    pad_id: int,
    seed: int,
    dp: DPContext | None = None,
    grad_sample_module=None,
    progress=None,
    proximal_mu: float = 0.0,
) -> TrainStats:
    """Run `cfg.steps_for(len(dataset))` optimizer steps on this site's data.

    With `dp`, the step is private (fedslm.privacy.dp_step) and the returned ledger holds
    this round's steps; `grad_sample_module` is the Opacus wrapper around `peft_model`
    that the caller keeps across rounds. With `proximal_mu`, each step ends with FedProx's
    pull toward the global adapter.
    """
    start = time.perf_counter()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    pull = ProximalPull(params, cfg.lr, proximal_mu) if proximal_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # under DP the batches and the noise come from secret randomness (the seed is public);
    # Opacus's Poisson sampler inherits the loader's generator
    rng = DPRandomness.secret(test_seed=seed) if dp is not None else None
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=make_collate(pad_id),
                        generator=rng.sampling if rng else torch.Generator().manual_seed(seed))
    private = PrivateStep(dp, grad_sample_module, optimizer, loader, rng.noise) if rng else None
    if private is not None:
        optimizer, loader = private.optimizer, private.loader

    peft_model.train()
    losses, seen, empty, steps = [], 0, 0, 0
    split = private is not None and 0 < cfg.max_physical_batch
    with private.physical_batches(cfg.max_physical_batch) if split else nullcontext(loader) as batches_of:
        batches = _cycle(batches_of)
        while steps < cfg.steps_for(len(dataset)):
            batch = next(batches)
            optimizer.zero_grad(set_to_none=True)
            if _is_empty(batch):
                private.empty_batch(params)
                empty += 1
            else:
                per_seq = sequence_losses(peft_model, batch)  # (B,)
                private.backward(per_seq) if private is not None else per_seq.mean().backward()
                losses.append(per_seq.detach().mean().item())
                seen += per_seq.shape[0]
            optimizer.step()
            # with physical batches, Opacus skips the step until its logical batch is complete
            if getattr(optimizer, "_is_last_step_skipped", False):
                continue
            if pull is not None:
                pull()
            steps += 1
            if progress is not None:
                progress(losses[-1] if losses else float("nan"))
    optimizer.zero_grad(set_to_none=True)
    if grad_sample_module is not None:
        clear_grad_samples(params)
    return TrainStats(
        steps=steps,
        empty_steps=empty,
        examples_seen=seen,
        mean_loss=float(sum(losses) / len(losses)) if losses else math.nan,
        seconds=time.perf_counter() - start,
        ledger=private.ledger() if private is not None else None,
    )


def _cycle(loader):
    while True:
        yield from loader


def _is_empty(batch) -> bool:
    if isinstance(batch, (list, tuple)):
        return len(batch) == 0 or batch[0].shape[0] == 0
    return batch["input_ids"].shape[0] == 0
