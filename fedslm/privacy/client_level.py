"""Client-level (site-level) DP: the server clips each site's update and noises the
aggregate with Flower's DP strategy wrappers; this module owns the choice of clipping and
the epsilon it gives."""

from __future__ import annotations

from fedslm.config import RunConfig
from fedslm.privacy.accounting import RDP_ALPHAS

# privacy.client_clipping -> the Flower wrapper that implements it (imported when used)
CLIPPING = {
    "fixed": "DifferentialPrivacyServerSideFixedClipping",
    "adaptive": "DifferentialPrivacyServerSideAdaptiveClipping",
}


def with_client_level_dp(strategy, cfg: RunConfig, per_round: int):
    """Wrap fedslm's strategy in Flower's server-side DP wrapper when asked to."""
    p = cfg.privacy
    if not p.client_level:
        return strategy
    import flwr.serverapp.strategy as flwr_strategies

    wrapper = getattr(flwr_strategies, CLIPPING[p.client_clipping])
    if p.client_clipping == "adaptive":
        # Flower's default noise on the clipped-count (sites/20) is too small to leave any
        # noise for the update at small federations; a count noise of at least the update's
        # noise multiplier keeps most of the budget on the update (Andrew et al. 2021)
        return wrapper(
            strategy, p.client_noise_multiplier, per_round, initial_clipping_norm=p.client_clip_norm,
            clipped_count_stddev=max(per_round / 20, p.client_noise_multiplier),
        )
    return wrapper(strategy, p.client_noise_multiplier, p.client_clip_norm, per_round)


def client_level_epsilon(noise_multiplier: float, sampled_per_round: int, averaged: list[int], delta: float) -> float:
    """Epsilon of a whole site's participation under server-side clipping + noise.

    One Gaussian release per round and no credit for sampling: the sites are drawn by the
    coordinator from a public seed, so amplification by subsampling would not hold. Flower
    calibrates the noise for the sampled count k, but the mean is taken over the m replies
    that survive; a mean over fewer sites moves more per site, so a round with m < k is
    accounted at the noise multiplier it really had, noise_multiplier * m / k."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise_multiplier * m / sampled_per_round, 1.0, 1) for m in averaged if m > 0]
    if not acc.history:
        return 0.0
    return float(acc.get_epsilon(delta=delta, alphas=RDP_ALPHAS))
