"""The privacy guarantee of a run, as data (privacy.json) and as the model card states it.

Both are made from what the sites reported (their ledgers' epsilon, noise and sampling
rate), not from what the config asked for.
"""

from __future__ import annotations

from fedslm.config import RunConfig
from fedslm.privacy.accounting import expected_rounds, sites_per_round
from fedslm.privacy.client_level import client_level_epsilon
from fedslm.privacy.releases import released


def privacy_report(cfg: RunConfig, train_metrics: dict[int, dict[int, dict]],
                   eval_metrics: dict[int, dict[int, dict]] | None = None, warm_start: dict | None = None) -> dict:
    """`train_metrics` / `eval_metrics`: round -> site -> the metrics of its reply;
    `warm_start`: what the server's public warm start trained on (fedslm.server.warm_start)."""
    report = _privacy_report(cfg, train_metrics, eval_metrics)
    if warm_start is not None:
        report["warm_start"] = {**warm_start, "covers": "public data at the server before any private round: no "
                                                         "site data, so no privacy cost and not in any epsilon"}
    return report


def _privacy_report(cfg: RunConfig, train_metrics: dict[int, dict[int, dict]],
                    eval_metrics: dict[int, dict[int, dict]] | None = None) -> dict:
    last: dict[int, dict] = {}
    for r in sorted(train_metrics):
        last.update(train_metrics[r])
    p, fed = cfg.privacy, cfg.federation
    what = released(train_metrics, eval_metrics or {}, p.enabled)
    client = None
    if p.client_level:
        per_round = sites_per_round(fed)
        averaged = [len(train_metrics[r]) for r in sorted(train_metrics) if r > 0 and train_metrics[r]]
        client = {
            "mechanism": f"server-side {p.client_clipping} clipping of each site's adapter update + Gaussian noise "
                         "on the aggregate (Flower DP strategy wrapper), uniform site weights",
            "noise_multiplier": p.client_noise_multiplier,
            "clip_norm": p.client_clip_norm,
            "replies_averaged_per_round": averaged,
            "epsilon": client_level_epsilon(p.client_noise_multiplier, per_round, averaged, p.delta),
            "delta": p.delta,
            "accountant": "rdp",
            "covers": "all records of a site together (site-level), against users of the model only: "
                      "the coordinator adds this noise and sees every update before it",
        }
    if not p.enabled:
        out = {"level": "client" if client else "none", "rounds": fed.rounds, "sites": len(last), "released": what}
        return {**out, "client_level": client} if client else out
    return {
        "released": what,
        "level": "sample+client" if client else "sample",
        "client_level": client,
        "mechanism": "DP-SGD: Poisson-subsampled Gaussian mechanism with per-example clipping (Opacus)",
        "accountant": cfg.privacy.accountant,
        "target_epsilon": cfg.privacy.epsilon,
        "delta": cfg.privacy.delta,
        "max_grad_norm": cfg.privacy.max_grad_norm,
        "epsilon_per_site": {str(s): m["epsilon"] for s, m in sorted(last.items())},
        "epsilon_rdp_per_site": {str(s): m["epsilon_rdp"] for s, m in sorted(last.items())},
        "epsilon_prv_per_site": {str(s): m["epsilon_prv"] for s, m in sorted(last.items())},
        "noise_multiplier_per_site": {str(s): round(m["noise_multiplier"], 4) for s, m in sorted(last.items())},
        "sample_rate_per_site": {str(s): m["sample_rate"] for s, m in sorted(last.items())},
        "steps_per_site": {str(s): int(m["steps_total"]) for s, m in sorted(last.items())},
        "rounds": cfg.federation.rounds,
        "expected_rounds_per_site": expected_rounds(cfg.federation),
        "sites": len(last),
        "covers": "each training record of each site (sample-level); not a site as a whole",
    }


def guarantee_text(privacy: dict) -> tuple[str, str]:
    """The model card's two paragraphs for a privacy.json: the guarantee, and what it covers."""
    level = privacy.get("level", "none")
    if level.startswith("sample"):
        eps = max(privacy["epsilon_per_site"].values(), default=0.0)
        guarantee = (
            f"Trained with sample-level differential privacy (DP-SGD, Opacus) at every site: "
            f"({eps:.2f}, {privacy['delta']:g})-DP per site (target epsilon {privacy['target_epsilon']}), "
            f"over {privacy['rounds']} rounds and {privacy['sites']} sites, accountant `{privacy['accountant']}`. "
            f"Per-example gradients were clipped to norm {privacy['max_grad_norm']} and Gaussian noise "
            f"was added (noise multiplier per site: {privacy['noise_multiplier_per_site']})."
        )
        if privacy.get("epsilon_prv_per_site"):
            guarantee += (
                f" For comparison, epsilon per site by the RDP accountant: {_rounded(privacy['epsilon_rdp_per_site'])}; "
                f"by the PRV accountant: {_rounded(privacy['epsilon_prv_per_site'])}."
            )
        scope = (
            "This protects each single training record (one question and answer) of each site: "
            "the model is almost as likely to have come out without any one record. It does not "
            "protect facts that appear in many records of a site, nor the identity of a site as a "
            "whole (no client-level DP in this run), nor the base model's own training data."
        )
    elif level == "client":
        guarantee = "No sample-level DP; site-level (client-level) DP only, see below."
        scope = "Each site as a whole is protected at the client-level epsilon below; single records have no separate bound."
    else:
        guarantee = "Trained WITHOUT differential privacy: no formal privacy guarantee."
        scope = "Training records may be memorised and extractable from this model."
    client = privacy.get("client_level")
    if client:
        scope += (
            f"\n\nSite-level DP on top: each site's adapter update was clipped to norm {client['clip_norm']} "
            f"({client['mechanism']}) with noise multiplier {client['noise_multiplier']}: "
            f"({client['epsilon']:.2f}, {client['delta']:g})-DP for everything a site contributed, against "
            "users of this model (not against the coordinator, which added the noise), with no credit "
            "taken for the sampling of sites."
        )
    warm = privacy.get("warm_start")
    if warm:
        scope += (f"\n\nBefore the private rounds, the coordinator trained the starting adapter on public data "
                  f"only ({warm['data']}: {warm['rows']} rows, {warm['epochs']:g} epochs). That step read no "
                  "site's data and spent no privacy budget (epsilon 0); the epsilon above covers the sites' records.")
    released = privacy.get("released") or {}
    if level.startswith("sample") and released.get("not_covered"):
        scope += ("\n\nThe guarantee holds against the coordinator too, as long as each site ran only "
                  "fedslm code it trusts (a deployed site's worker runs only apps signed by a publisher key "
                  "the site trusts): each site drew its noise and batches from its own OS entropy and "
                  "enforced its own policy and lifetime budget. Released by the sites outside it: "
                  + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in released["not_covered"].items())
                  + f". Held-out losses released per site: {released.get('held_out_losses_per_site', {})}.")
    return guarantee, scope


def _rounded(per_site: dict) -> str:
    return ", ".join(f"site {k} {v:.2f}" for k, v in per_site.items())
