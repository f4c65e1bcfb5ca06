"""The four ways fedslm federates a LoRA adapter, each in one place for both sides.

A scheme says what the global adapter is, what a site of rank r loads from it and trains,
what the site's reply means as an effective update (scale * B @ A per layer), and how the
server combines replies into the next global adapter:

- fedavg: average A and B separately (what most peers do; not the average of the updates)
- ffa:    A frozen from the shared seed, only B trained and averaged (exact)
- exact:  average the sites' products B_i A_i and re-factor by a truncated SVD to the
          global rank (FlexLoRA); sites of a lower rank take the leading components
- stack:  concatenate the sites' factors (FLoRA): exact at any ranks; the stack is merged
          into each site's base weights, and every round trains a fresh adapter on top
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedslm.lora.algebra import Terms, a_key, b_key, dense, dense_svd, layer_of, truncated_svd, weighted_sum

Tensors = dict[str, torch.Tensor]
RULES = ("mean", "median", "trimmed_mean")


@dataclass
class SiteUpdate:
    """A validated reply: the tensors a site sent (fp32), its LoRA rank and its weight."""

    tensors: Tensors
    rank: int
    weight: float


def reduce_arrays(arrays: list[torch.Tensor], weights: list[float], rule: str, trim: float) -> torch.Tensor:
    """Coordinate-wise combination of the sites' arrays: the weighted mean, or Flower's
    FedMedian / FedTrimmedAvg rules (unweighted, as Flower defines them)."""
    if rule == "mean":
        total = float(sum(weights))
        return sum(a.double() * (w / total) for a, w in zip(arrays, weights, strict=True)).float()
    stacked = np.stack([a.double().numpy() for a in arrays])
    if rule == "median":
        return torch.from_numpy(np.median(stacked, axis=0)).float()
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

    return torch.from_numpy(trim_mean(stacked, trim)).float()


class Scheme:
    name = ""
    trains_a = True  # False only for FFA-LoRA
    mixed_ranks = False  # sites may train ranks below the global rank
    fixed_coordinates = True  # the global is a fixed set of arrays a server optimiser can step
    robust_rules = RULES

    def __init__(self, init: Tensors, rank: int, alpha: float):
        """`init`: every LoRA tensor at the global rank, as attach_lora builds it from the shared seed."""
        self.init = {k: v.detach().float() for k, v in init.items()}
        self.rank = rank
        self.alpha = float(alpha)
        self.layers = sorted({layer_of(k) for k in init})

    def scale(self, r: int) -> float:
        return self.alpha / r

    def dims(self, layer: str) -> tuple[int, int]:
        return self.init[b_key(layer)].shape[0], self.init[a_key(layer)].shape[1]

    # --- the global adapter ---------------------------------------------------------
    def initial_global(self) -> Tensors:
        return dict(self.init)

    def peft_view(self, g: Tensors) -> tuple[int, float, Tensors]:
        """(rank, alpha, every A and B) to build a peft adapter equal to the global."""
        return self.rank, self.alpha, dict(g)

    # --- a site -----------------------------------------------------------------------
    def reply_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        out = {}
        for layer in self.layers:
            o, i = self.dims(layer)
            out[b_key(layer)] = (o, r)
            if self.trains_a:
                out[a_key(layer)] = (r, i)
        return out

    def site_start(self, g: Tensors, r: int, own_init: Tensors | None) -> Tensors:
        """The trainable tensors a site of rank r loads before training."""
        return dict(g)

    def base_delta(self, g: Tensors) -> dict[str, torch.Tensor] | None:
        """Per layer, a dense update to merge into the site's base weights (stack only)."""
        return None

    # --- effective updates ---------------------------------------------------------------
    def update_terms(self, tensors: Tensors, r: int) -> dict[str, Terms]:
        """A site's adapter (what it sent) as scale * B @ A per layer."""
        s = self.scale(r)
        return {layer: [(s, tensors[b_key(layer)], tensors[a_key(layer)])] for layer in self.layers}

    def start_terms(self, g: Tensors, r: int) -> dict[str, Terms]:
        """The adapter a site of rank r starts from, as scale * B @ A per layer."""
        return self.update_terms(self.site_start(g, r, None), r)

    # --- the server ----------------------------------------------------------------------
    def combine(self, g: Tensors, updates: list[SiteUpdate], rule: str, trim: float) -> tuple[Tensors, dict[str, Terms]]:
        """(next global, its effective update per layer) from the round's valid updates."""
        weights = [u.weight for u in updates]
        # in the global's key order: Flower's FedAvgM pairs arrays by position
        new = {k: reduce_arrays([u.tensors[k] for u in updates], weights, rule, trim) for k in g}
        return new, self.update_terms({**g, **new}, self.rank)


class FedAvgScheme(Scheme):
    name = "fedavg"


class FFAScheme(Scheme):
    name = "ffa"
    trains_a = False

    def initial_global(self) -> Tensors:
        return {k: v for k, v in self.init.items() if ".lora_B." in k}

    def peft_view(self, g: Tensors) -> tuple[int, float, Tensors]:
        return self.rank, self.alpha, {**self.init, **g}

    def update_terms(self, tensors: Tensors, r: int) -> dict[str, Terms]:
        # A is the shared frozen one: the server rebuilt it from the same seed
        return super().update_terms({**self.init, **tensors}, r)


class ExactScheme(Scheme):
    """FlexLoRA: the global is the best rank-r approximation of the mean of B_i A_i.

    Of the many factorisations of U S V^T, A = c V^T keeps A's rows orthogonal with the row
    norm c of peft's initial A, and B = U S / (c scale) carries the magnitude: sites then
    train from factors on the scale they were initialised at, not from sqrt(S)-sized ones
    that would shrink the gradients of B early on.
    """

    name = "exact"
    mixed_ranks = True
    fixed_coordinates = False

    def site_start(self, g: Tensors, r: int, own_init: Tensors | None) -> Tensors:
        # the global's components are ordered by singular value: a rank-r site takes the
        # leading r, which is the best rank-r approximation of the global
        ratio = self.scale(self.rank) / self.scale(r)
        out = {}
        for layer in self.layers:
            out[a_key(layer)] = g[a_key(layer)][:r].clone()
            out[b_key(layer)] = g[b_key(layer)][:, :r] * ratio
        return out

    def combine(self, g: Tensors, updates: list[SiteUpdate], rule: str, trim: float) -> tuple[Tensors, dict[str, Terms]]:
        weights = [u.weight for u in updates]
        per_site = [self.update_terms(u.tensors, u.rank) for u in updates]
        target = weighted_sum(per_site, weights)
        new: Tensors = {}
        for layer in self.layers:
            if rule == "mean":
                f = truncated_svd(target[layer], self.rank)
            else:  # a robust rule acts on the dense effective updates, then re-factor
                mats = [dense(t[layer]) for t in per_site]
                f = dense_svd(reduce_arrays(mats, weights, rule, trim).double(), self.rank)
            new.update(self._factors(layer, f))
        return new, self.update_terms(new, self.rank)

    def _factors(self, layer: str, f) -> Tensors:
        a0 = self.init[a_key(layer)]
        c = float(a0.norm(dim=1).mean())
        k = len(f.s)
        a = torch.cat([c * f.v.T, a0[k:].double()], dim=0)
        b = torch.cat([f.u * f.s / (c * self.scale(self.rank)), torch.zeros(f.u.shape[0], self.rank - k, dtype=torch.float64)], dim=1)
        return {a_key(layer): a.float(), b_key(layer): b.float()}


class StackScheme(Scheme):
    """FLoRA: the global is the stack of every site's scaled B_i and A_i of every round so
    far (rank grows by the sum of site ranks each round; scale folded into B). Stacking is
    exact at any ranks; a site merges the stack into its base weights and trains a fresh
    adapter (B = 0) on top."""

    name = "stack"
    mixed_ranks = True
    fixed_coordinates = False
    robust_rules = ("mean",)  # a median of products has no stacked form

    def initial_global(self) -> Tensors:
        out = {}
        for layer in self.layers:
            o, i = self.dims(layer)
            out[a_key(layer)] = torch.zeros(0, i)
            out[b_key(layer)] = torch.zeros(o, 0)
        return out

    def stack_rank(self, g: Tensors) -> int:
        return g[a_key(self.layers[0])].shape[0]

    def peft_view(self, g: Tensors) -> tuple[int, float, Tensors]:
        r = self.stack_rank(g)
        if r == 0:  # nothing trained yet: a rank-1 adapter that adds zero
            return 1, 1.0, {k: torch.zeros(v.shape[0], 1) if ".lora_B." in k else torch.zeros(1, v.shape[1]) for k, v in g.items()}
        return r, float(r), dict(g)  # alpha = r: scale 1, already folded into B

    def site_start(self, g: Tensors, r: int, own_init: Tensors | None) -> Tensors:
        out = {b_key(layer): torch.zeros(self.dims(layer)[0], r) for layer in self.layers}
        if own_init is not None:
            out.update({k: v for k, v in own_init.items() if ".lora_A." in k})
        return out

    def start_terms(self, g: Tensors, r: int) -> dict[str, Terms]:
        return {layer: [] for layer in self.layers}

    def base_delta(self, g: Tensors) -> dict[str, torch.Tensor]:
        return {layer: g[b_key(layer)] @ g[a_key(layer)] for layer in self.layers}

    def combine(self, g: Tensors, updates: list[SiteUpdate], rule: str, trim: float) -> tuple[Tensors, dict[str, Terms]]:
        total = float(sum(u.weight for u in updates))
        new, block = dict(g), {}
        for layer in self.layers:
            bs = [u.tensors[b_key(layer)] * (self.scale(u.rank) * u.weight / total) for u in updates]
            as_ = [u.tensors[a_key(layer)] for u in updates]
            block[layer] = [(1.0, torch.cat(bs, dim=1), torch.cat(as_, dim=0))]
            new[b_key(layer)] = torch.cat([g[b_key(layer)], *bs], dim=1)
            new[a_key(layer)] = torch.cat([g[a_key(layer)], *as_], dim=0)
        return new, block


SCHEMES = {s.name: s for s in (FedAvgScheme, FFAScheme, ExactScheme, StackScheme)}


def make_scheme(name: str, init: Tensors, rank: int, alpha: float) -> Scheme:
    return SCHEMES[name](init, rank, alpha)
