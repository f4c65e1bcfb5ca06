"""Checks a site's training reply must pass before it can touch the global adapter.

Each returns None when the reply is fine, or one sentence saying what is wrong; the
strategy rejects the reply with that sentence and the round goes on with the rest.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedslm.lora.schemes import Scheme, SiteUpdate
from fedslm.transport import named_arrays

WEIGHT_KEY = "num-examples"


def reply_problem(content, scheme: Scheme, global_rank: int, needs_weight: bool = True,
                  frozen_a: int | None = None) -> str | None:
    """Records, weight (when the aggregate uses one), the frozen A's fingerprint (FFA:
    `frozen_a`, from fedslm.lora.adapter.a_digest), rank, exact key set and shapes for
    that rank, dtype, finiteness."""
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        return "reply lacks the 'arrays' or 'metrics' record"
    metrics = content.metric_records["metrics"]
    weight = metrics.get(WEIGHT_KEY)
    if needs_weight and (not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0):
        return f"'{WEIGHT_KEY}' must be a finite positive number, got {weight!r}"
    rank = metrics.get("lora_r")
    if not isinstance(rank, int) or not 1 <= rank <= global_rank:
        return f"'lora_r' must be an integer rank in [1, {global_rank}], got {rank!r}"
    if rank != global_rank and not scheme.mixed_ranks:
        return (f"site trains rank {rank} but strategy {scheme.name} needs every site at the global rank "
                f"{global_rank}; heterogeneous ranks need strategy=exact or stack")
    if frozen_a is not None and metrics.get("a_digest") != frozen_a:
        return (f"the site's frozen A differs from the coordinator's (a_digest {metrics.get('a_digest')!r}, expected "
                f"{frozen_a}): another lora.init_seed, base model or target modules")
    expected = scheme.reply_shapes(rank)
    try:
        arrays = named_arrays(content.array_records["arrays"])
    except ValueError as err:
        return str(err)
    keys = set(arrays.keys())
    if keys != set(expected):
        return (f"adapter keys differ from those of a rank-{rank} {scheme.name} adapter: "
                f"{len(set(expected) - keys)} missing, {len(keys - set(expected))} unexpected")
    for key, values in arrays.items():
        if tuple(values.shape) != expected[key]:
            return f"{key}: shape {tuple(values.shape)}, expected {expected[key]} for rank {rank}"
        if values.dtype not in (np.float32, np.float16):
            return f"{key}: dtype {values.dtype}, expected float32 or float16"
        if not np.isfinite(values).all():
            return f"{key}: contains NaN or Inf"
    return None


def unchanged_or_zero(scheme: Scheme, update: SiteUpdate, sent: dict[str, torch.Tensor]) -> str | None:
    """An all-zero adapter, or one equal to what the site received: training did not
    happen (the silent failure when per-sample gradient hooks miss the LoRA weights)."""
    if all(not torch.any(t) for t in update.tensors.values()):
        return "every tensor is identically zero"
    start = scheme.site_start(sent, update.rank, None)
    if all(torch.equal(update.tensors[k], v) for k, v in start.items()):
        return "identical to the adapter the site received (nothing was trained)"
    return None


def norm_outliers(norms: list[float], ratio: float, previous: float | None = None) -> dict[int, str]:
    """Indices of update norms above `ratio` x the round's median, with the reason. With
    fewer than three updates the median cannot tell which one is wrong, so the yardstick
    is the previous aggregated round's median (`previous`), when there is one."""
    if ratio <= 0 or not norms:
        return {}
    if len(norms) >= 3:
        median, what = float(np.median(norms)), "the round's median"
    elif previous:
        median, what = previous, "the previous round's median"
    else:
        return {}
    return {
        i: f"update norm {n:.3g} is {n / median:.1f}x {what} {median:.3g} (limit {ratio:g}x, strategy.max_norm_ratio)"
        for i, n in enumerate(norms)
        if median > 0 and n > ratio * median
    }
