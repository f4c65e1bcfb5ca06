"""The one local training loop (DP or not) and held-out evaluation.

Loss is the mean over answer tokens of each sequence, then the mean over sequences: each
example contributes one per-sample loss, which is what per-sample clipping assumes. HF's
`labels=` loss averages over all tokens of the batch and would mix samples. Logits are
computed only at answer positions, because a full (batch x length x vocab) logit tensor
dominates memory for a 49k-token vocabulary.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from fedslm.config import PrivacyConfig, TrainConfig
from fedslm.data.errors import DataError
from fedslm.data.tokenize import TokenizedDataset, make_collate
from fedslm.privacy import PrivacyLedger, calibrate_noise


def sequence_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sequence mean cross-entropy over answer tokens, shape (batch,). `model` is a
    peft model or a plain causal LM."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    # position t predicts token t+1; score only positions whose next token is answer
    target_mask = batch["loss_mask"][:, 1:].bool()
    rows, cols = target_mask.nonzero(as_tuple=True)
    logits = lm.get_output_embeddings()(hidden[rows, cols])
    targets = batch["input_ids"][:, 1:][rows, cols]
    token_loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    n = batch["input_ids"].shape[0]
    sums = torch.zeros(n, dtype=token_loss.dtype, device=token_loss.device).index_add(0, rows, token_loss)
    counts = target_mask.sum(dim=1).clamp(min=1)
    return sums / counts


@dataclass
class DPPlan:
    """How one site's noise was set: for the whole federation, not one round."""

    noise_multiplier: float
    sample_rate: float
    total_steps: int


def plan_dp(cfg: PrivacyConfig, train: TrainConfig, num_examples: int, rounds: int) -> DPPlan:
    # Opacus samples each example with probability 1 / len(loader) = 1 / ceil(N / B);
    # calibrate with exactly that rate.
    sample_rate = 1.0 / math.ceil(num_examples / train.batch_size)
    total = train.local_steps * rounds
    return DPPlan(calibrate_noise(cfg, sample_rate, total), sample_rate, total)


def _plan_or_none(cfg: PrivacyConfig, train: TrainConfig, n: int, rounds: int) -> DPPlan | None:
    try:
        return plan_dp(cfg, train, n, rounds)
    except ValueError:  # Opacus gives up when no noise level reaches the target
        return None


def _noise_for(cfg: PrivacyConfig, train: TrainConfig, n: int, rounds: int) -> float:
    plan = _plan_or_none(cfg, train, n, rounds)
    return math.inf if plan is None else plan.noise_multiplier


def check_site_size(cfg: PrivacyConfig, train: TrainConfig, num_examples: int, rounds: int, site: int) -> DPPlan:
    """The DP plan for this site, or a DataError saying how many examples it needs."""
    if num_examples < train.batch_size:
        raise DataError(
            f"site {site} has {num_examples} training examples, fewer than train.batch_size={train.batch_size}; "
            "give it more data or lower train.batch_size"
        )
    plan = _plan_or_none(cfg, train, num_examples, rounds)
    if plan is not None and plan.noise_multiplier <= cfg.max_noise_multiplier:
        return plan
    sigma = math.inf if plan is None else plan.noise_multiplier
    low, high = num_examples, num_examples * 2
    while _noise_for(cfg, train, high, rounds) > cfg.max_noise_multiplier and high < 10**8:
        low, high = high, high * 2
    while high - low > max(1, low // 50):
        mid = (low + high) // 2
        low, high = (low, mid) if _noise_for(cfg, train, mid, rounds) <= cfg.max_noise_multiplier else (mid, high)
    raise DataError(
        f"site {site} has {num_examples} training examples: too few for epsilon {cfg.epsilon} over "
        f"{train.local_steps * rounds} DP steps of batch {train.batch_size} (noise multiplier "
        f"{sigma:.1f} > privacy.max_noise_multiplier={cfg.max_noise_multiplier}); it needs about {high} "
        "examples, or a larger privacy.epsilon, fewer train.local_steps/rounds, or a smaller train.batch_size"
    )


@dataclass
class TrainStats:
    steps: int
    empty_steps: int
    examples_seen: int
    mean_loss: float
    seconds: float
    ledger: PrivacyLedger | None = None


@dataclass
class DPContext:
    """What a private local round needs: the settings, the plan and the ledger so far."""

    cfg: PrivacyConfig
    plan: DPPlan
    ledger: PrivacyLedger


def wrap_for_dp(peft_model, cfg: PrivacyConfig):
    """The Opacus wrapper for `cfg.grad_sample_mode`; callers keep it across rounds.
    `lora` is fedslm's own per-sample path for LoRA factors (fedslm.lora_grad_sample)."""
    from opacus.grad_sample.utils import prepare_module

    if cfg.grad_sample_mode == "lora":
        from fedslm.lora_grad_sample import wrap_lora_for_dp

        return wrap_lora_for_dp(peft_model)
    kwargs = {"max_grad_norm": cfg.max_grad_norm} if cfg.grad_sample_mode == "ghost" else {}
    return prepare_module(peft_model, cfg.grad_sample_mode, True, **kwargs)


def _opacus_mode(mode: str) -> str:
    # the lora path fills grad_sample itself; Opacus only clips, noises and accounts
    return "no_op" if mode == "lora" else mode


class _PerSequenceLoss:
    """Ghost clipping asks a criterion for per-sample losses; ours are already computed."""

    reduction = "mean"

    def __call__(self, per_sequence: torch.Tensor) -> torch.Tensor:
        return per_sequence


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
    """Run `cfg.local_steps` optimizer steps on this site's data.

    With `dp`, Opacus makes the step private: Poisson-sampled batches, per-sample clipping
    to `max_grad_norm`, Gaussian noise, and its accountant appends this round's steps to
    the site's ledger. `grad_sample_module` is a GradSampleModule around `peft_model`
    that the caller keeps across rounds (wrapping adds hooks; once is enough).

    With `proximal_mu` (FedProx), every step also pulls the parameters toward where they
    started, w <- w - lr * mu * (w - w_start): applied after the (private) step, it never
    touches the data, so it adds nothing to the privacy cost, and Opacus's per-sample
    gradients (which would drop a loss-side proximal term) are not involved.
    """
    start = time.perf_counter()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=make_collate(pad_id), generator=gen
    )
    engine, criterion = None, None
    ghost = dp is not None and dp.cfg.grad_sample_mode == "ghost"
    if dp is not None:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant=dp.cfg.accountant, secure_mode=dp.cfg.secure_mode)
        engine.accountant.history = list(dp.ledger.history)
        noise_gen = None if dp.cfg.secure_mode else torch.Generator().manual_seed(seed + 1)
        private = engine.make_private(
            module=grad_sample_module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.plan.noise_multiplier,
            max_grad_norm=dp.cfg.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_gen,
            grad_sample_mode=_opacus_mode(dp.cfg.grad_sample_mode),
            **({"criterion": _PerSequenceLoss()} if ghost else {}),
        )
        optimizer, loader = private[1], private[-1]
        criterion = private[2] if ghost else None

    peft_model.train()
    losses, seen, empty = [], 0, 0
    split = dp is not None and 0 < cfg.max_physical_batch
    with _physical_batches(loader, optimizer, cfg.max_physical_batch) if split else nullcontext(loader) as batches_of:
        batches = _cycle(batches_of)
        steps = 0
        while steps < cfg.local_steps:
            batch = next(batches)
            optimizer.zero_grad(set_to_none=True)
            if _is_empty(batch):
                # Poisson sampling drew nobody. The step must still be taken (and noised)
                # for the accounting to hold: Opacus treats empty grad samples as a noise-only step.
                for p in params:
                    if ghost:  # ghost clipping accumulates p.grad, not grad samples
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                empty += 1
            else:
                per_seq = sequence_losses(peft_model, batch)
                # ghost: Opacus runs a norm pass and a clipped-loss pass from this tensor
                (criterion(per_seq) if ghost else per_seq.mean()).backward()
                losses.append(per_seq.detach().mean().item())
                seen += per_seq.shape[0]
            optimizer.step()
            # with physical batches, Opacus skips the step until its logical batch is complete
            if getattr(optimizer, "_is_last_step_skipped", False):
                continue
            if anchors is not None:
                with torch.no_grad():
                    for p, a in zip(params, anchors):
                        p.sub_(cfg.lr * proximal_mu * (p - a))
            steps += 1
            if progress is not None:
                progress(losses[-1] if losses else float("nan"))
    optimizer.zero_grad(set_to_none=True)
    ledger = PrivacyLedger(list(engine.accountant.history)) if engine is not None else None
    if grad_sample_module is not None:
        _clear_grad_samples(params)
    return TrainStats(
        steps=steps,
        empty_steps=empty,
        examples_seen=seen,
        mean_loss=float(sum(losses) / len(losses)) if losses else math.nan,
        seconds=time.perf_counter() - start,
        ledger=ledger,
    )


@torch.no_grad()
def evaluate_loss(peft_model, dataset: TokenizedDataset, batch_size: int, pad_id: int) -> float:
    """Mean per-sequence answer loss over a held-out set."""
    peft_model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=make_collate(pad_id))
    total, n = 0.0, 0
    for batch in loader:
        per_seq = sequence_losses(peft_model, batch)
        total += per_seq.sum().item()
        n += per_seq.shape[0]
    return total / max(n, 1)


def _physical_batches(loader, optimizer, max_physical: int):
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    return BatchMemoryManager(data_loader=loader, max_physical_batch_size=max_physical, optimizer=optimizer)


def _cycle(loader):
    while True:
        yield from loader


def _is_empty(batch) -> bool:
    if isinstance(batch, (list, tuple)):
        return len(batch) == 0 or batch[0].shape[0] == 0
    return batch["input_ids"].shape[0] == 0


def _clear_grad_samples(params) -> None:
    for p in params:
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                setattr(p, attr, None)
