"""The server side of a run: round 0 evaluation, the strategy's rounds, and the outputs.

config -> global adapter init -> [sites train with DP -> LoRA-aware aggregation] x rounds
       -> per-round adapters -> merged model + privacy.json + summary.json + curves.png
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedslm import quiet
from fedslm.adapter import adapter_state, attach_lora
from fedslm.aggregation import strategy_for
from fedslm.config import RunConfig, to_run_config
from fedslm.data.clinic import demo_question
from fedslm.export import export_merged
from fedslm.lora_schemes import make_scheme
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.privacy import client_level_epsilon, expected_rounds, sites_per_round
from fedslm.reporting import RunRecorder
from fedslm.server_eval import server_evaluate_fn
from fedslm.resume import Checkpoint, ResumableRounds, new_run_key, restore
from fedslm.transport import from_record, to_record


def run_server(grid: Grid, cfg: RunConfig, echo=print) -> dict:
    quiet.silence_known_noise()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # we print our own round lines
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpoint_to_resume(cfg, run_dir) if cfg.resume else None
    (run_dir / "run_config.json").write_text(json.dumps(to_run_config(cfg), indent=2))

    model_dir = resolve_model_dir(cfg.model)
    base, _ = load_base_model(model_dir)
    # every LoRA tensor at the global rank, from the seed all sites share
    scheme = make_scheme(cfg.strategy.name, adapter_state(attach_lora(base, cfg.lora, freeze_a=False)),
                         cfg.lora.r, cfg.lora.alpha)
    initial_adapter = scheme.initial_global()
    initial = to_record(initial_adapter, "float32")
    del base

    fed = cfg.federation
    per_round = sites_per_round(fed)
    min_sites = fed.min_sites or per_round
    recorder = RunRecorder(
        run_dir, fed.rounds, meta={"strategy": cfg.strategy.name, "lora_r": str(cfg.lora.r)}, echo=echo
    )
    strategy = strategy_for(cfg, scheme, recorder, per_round, min_sites)
    strategy = with_client_level_dp(strategy, cfg, per_round)
    done = ckpt.server_round if ckpt else 0
    start_arrays = restore(strategy, recorder, ckpt) if ckpt else initial
    start_adapter = {k: v.float() for k, v in ckpt.arrays.items()} if ckpt else initial_adapter
    # the run key names the sites' privacy ledgers; a resumed run keeps its own
    run_key = ckpt.run_key if ckpt else new_run_key()
    rounds = ResumableRounds(strategy, recorder, run_dir, run_key, done)
    echo(
        f"federation: {fed.sites} sites x {fed.rounds} rounds ({per_round} training per round), "
        f"strategy {describe_strategy(cfg)}, LoRA r={cfg.lora.r}"
        + (f" (site ranks {cfg.lora.site_ranks})" if cfg.lora.site_ranks else "")
        + f", {sum(v.numel() for k, v in scheme.init.items() if scheme.trains_a or '.lora_B.' in k):,} trainable values per site, "
        + (f"DP target epsilon {cfg.privacy.epsilon} (delta {cfg.privacy.delta})" if cfg.privacy.enabled else "no DP")
    )

    if ckpt:
        echo(f"resuming {run_dir} after round {done}/{fed.rounds} (saved global adapter and server state)")
    else:
        # round 0: the base model's held-out loss at every site, the baseline for the curves
        replies = grid.send_and_receive(strategy.configure_evaluate(0, initial, ConfigRecord(), grid),
                                        timeout=fed.timeout_s)
        strategy.aggregate_evaluate(0, replies)

    result = rounds.start(
        grid=grid, initial_arrays=start_arrays, num_rounds=fed.rounds - done, timeout=fed.timeout_s,
        train_config=ConfigRecord({"run-key": run_key}), evaluate_config=ConfigRecord(),
        evaluate_fn=server_evaluate_fn(cfg, scheme, model_dir, recorder),
    )
    final = from_record(result.arrays) if len(result.arrays) else start_adapter
    rank, alpha, final_view = scheme.peft_view(final)

    privacy = privacy_report(cfg, recorder)
    (run_dir / "privacy.json").write_text(json.dumps(privacy, indent=2))
    extra = {
        "strategy": cfg.strategy.name,
        "delta": cfg.privacy.delta,
        "target_epsilon": cfg.privacy.epsilon if cfg.privacy.enabled else None,
        "client_level_epsilon": (privacy.get("client_level") or {}).get("epsilon"),
        "privacy": privacy["level"],
        "model": str(model_dir),
        "transport_dtype": fed.transport_dtype,
        "global_rank": rank,
        "aggregation_error": max((e for e in strategy_errors(strategy).values()), default=None),
    }
    if cfg.export_model:
        prompts = [demo_question(cfg.seed)["prompt"], "What should I do about a cough?"]
        extra.update(export_merged(model_dir, cfg, final_view, rank, alpha, run_dir / "model", prompts, privacy))
        echo(f"merged model written to {run_dir / 'model'} (max |logit diff| vs base+adapter {extra['merge_max_abs_diff']:.2e})")
    summary = recorder.summary(extra)
    recorder.plot(cfg.privacy.epsilon if cfg.privacy.enabled else None)
    return summary


def _checkpoint_to_resume(cfg: RunConfig, run_dir: Path) -> Checkpoint:
    """The saved state of the run in run_dir, refusing one saved under another config
    (its rounds would not continue the same run)."""
    ckpt = Checkpoint.load(run_dir)
    saved_path = run_dir / "run_config.json"
    if saved_path.exists():
        saved, now = json.loads(saved_path.read_text()), to_run_config(cfg)
        ignore = {"resume", "output_dir", "export_model", "demo_answer", "federation.timeout_s"}
        changed = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
        if changed:
            raise ValueError(
                "resume=true, but the config differs from the saved run's (run_config.json) in: "
                + ", ".join(f"{k} (saved {saved.get(k)!r}, now {now.get(k)!r})" for k in changed)
                + "; resume with the same config, or start a new run in another output_dir"
            )
    if ckpt.server_round > cfg.federation.rounds:
        raise ValueError(f"resume=true: the saved run is at round {ckpt.server_round}, past federation.rounds="
                         f"{cfg.federation.rounds}")
    return ckpt


def describe_strategy(cfg: RunConfig) -> str:
    st = cfg.strategy
    parts = [st.name]
    if st.aggregator != "mean":
        parts.append(st.aggregator)
    if st.server_optimizer != "none":
        parts.append(f"server optimiser {st.server_optimizer} (lr {st.server_lr})")
    if st.proximal_mu:
        parts.append(f"FedProx mu {st.proximal_mu}")
    return " + ".join(parts)


def strategy_errors(strategy) -> dict[int, float]:
    """Per-round aggregation errors of fedslm's strategy, also from inside a DP wrapper."""
    inner = getattr(strategy, "strategy", strategy)
    return getattr(inner, "errors", {})


def with_client_level_dp(strategy, cfg: RunConfig, per_round: int):
    """Wrap fedslm's strategy in Flower's server-side DP wrapper when asked to."""
    p = cfg.privacy
    if not p.client_level:
        return strategy
    from flwr.serverapp.strategy import (
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    if p.client_clipping == "adaptive":
        # Flower's default noise on the clipped-count (sites/20) is too small to leave any
        # noise for the update at small federations; a count noise of at least the update's
        # noise multiplier keeps most of the budget on the update (Andrew et al. 2021)
        return DifferentialPrivacyServerSideAdaptiveClipping(
            strategy, p.client_noise_multiplier, per_round, initial_clipping_norm=p.client_clip_norm,
            clipped_count_stddev=max(per_round / 20, p.client_noise_multiplier),
        )
    return DifferentialPrivacyServerSideFixedClipping(strategy, p.client_noise_multiplier, p.client_clip_norm, per_round)


def privacy_report(cfg: RunConfig, recorder: RunRecorder) -> dict:
    last: dict[int, dict] = {}
    for r in sorted(recorder.log):
        last.update(recorder.log[r].train)
    p, fed = cfg.privacy, cfg.federation
    client = None
    if p.client_level:
        per_round = sites_per_round(fed)
        client = {
            "mechanism": f"server-side {p.client_clipping} clipping of each site's adapter update + Gaussian noise "
                         "on the aggregate (Flower DP strategy wrapper), uniform site weights",
            "noise_multiplier": p.client_noise_multiplier,
            "clip_norm": p.client_clip_norm,
            "sampling_rate": min(1.0, per_round / fed.sites),
            "epsilon": client_level_epsilon(p.client_noise_multiplier, per_round, fed.sites, fed.rounds, p.delta),
            "delta": p.delta,
            "accountant": "rdp",
            "covers": "all records of a site together (site-level)",
        }
    if not p.enabled:
        out = {"level": "client" if client else "none", "rounds": fed.rounds, "sites": len(last)}
        return {**out, "client_level": client} if client else out
    return {
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
