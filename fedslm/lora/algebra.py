"""LoRA updates in factored form: norms, differences and re-factoring without the dense matrix.

A LoRA layer adds `scale * B @ A` (B: out x r, A: r x in) to a base weight. Averaging sites'
adapters means averaging these products, and a sum of products is itself one product of
concatenated factors: sum_k c_k B_k A_k = [c_1 B_1 .. c_n B_n] @ [A_1; ..; A_n]. Every
function here works on such concatenations (a `Terms` list of (coefficient, B, A)), so the
out x in matrix is never formed: norms go through r x r Gram matrices and the truncated SVD
through two thin QR factorisations. All arithmetic is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Term = tuple[float, torch.Tensor, torch.Tensor]  # coefficient, B (out x r), A (r x in)
Terms = list[Term]


def layer_of(key: str) -> str:
    """'...q_proj.lora_A.weight' -> '...q_proj' (the adapted module)."""
    return key.split(".lora_")[0]


def a_key(layer: str) -> str:
    return f"{layer}.lora_A.weight"


def b_key(layer: str) -> str:
    return f"{layer}.lora_B.weight"


def concat(terms: Terms) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_cat, A_cat) with B_cat @ A_cat == sum_k c_k B_k A_k."""
    bs = [float(c) * b.double() for c, b, _ in terms]
    as_ = [a.double() for _, _, a in terms]
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def norm2(terms: Terms) -> float:
    """||sum_k c_k B_k A_k||_F^2 through the Gram matrices of the factors.

    A difference of two nearly equal sums cancels here, so relative errors below ~1e-8
    (the square root of float64's precision) read as ~1e-8; that is the floor of "exact".
    """
    if not terms:
        return 0.0
    b, a = concat(terms)
    return max(0.0, float(((b.T @ b) * (a @ a.T)).sum()))


def dense(terms: Terms) -> torch.Tensor:
    b, a = concat(terms)
    return b @ a


@dataclass
class Factored:
    """A truncated SVD: U (out x k), S (k), V (in x k), and every singular value before truncation."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    all_s: torch.Tensor

    @property
    def discarded2(self) -> float:
        return float((self.all_s[len(self.s):] ** 2).sum())

    @property
    def total2(self) -> float:
        return float((self.all_s ** 2).sum())


def truncated_svd(terms: Terms, rank: int) -> Factored:
    """The best rank-`rank` approximation of sum_k c_k B_k A_k (Eckart-Young), computed from
    the factors: B_cat = Qb Rb, A_cat^T = Qa Ra, so the sum is Qb (Rb Ra^T) Qa^T and only
    the small core matrix needs an SVD."""
    b, a = concat(terms)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, len(s))
    return Factored(u=(qb @ u)[:, :k], s=s[:k], v=(qa @ vh.T)[:, :k], all_s=s)


def dense_svd(matrix: torch.Tensor, rank: int) -> Factored:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    k = min(rank, len(s))
    return Factored(u=u[:, :k], s=s[:k], v=vh.T[:, :k], all_s=s)


def distance(x: dict[str, Terms], y: dict[str, Terms]) -> float:
    """sqrt(sum over layers ||x - y||_F^2): how far one adapter's update is from another's."""
    return sum(norm2(x.get(k, []) + [(-c, b, a) for c, b, a in y.get(k, [])]) for k in set(x) | set(y)) ** 0.5


def relative_error(approx: dict[str, Terms], target: dict[str, Terms]) -> float:
    """sqrt(sum over layers ||approx - target||^2) / sqrt(sum over layers ||target||^2)."""
    ref = sum(norm2(t) for t in target.values()) ** 0.5
    return distance(approx, target) / ref if ref > 0 else 0.0


def weighted_sum(per_site: list[dict[str, Terms]], weights: list[float]) -> dict[str, Terms]:
    """The weighted mean of sites' updates, still in factored form (weights are normalised)."""
    total = float(sum(weights))
    out: dict[str, Terms] = {}
    for terms, w in zip(per_site, weights, strict=True):
        for layer, ts in terms.items():
            out.setdefault(layer, []).extend((c * w / total, b, a) for c, b, a in ts)
    return out
