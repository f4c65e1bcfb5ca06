"""The server side of a run: round 0 evaluation, the strategy's rounds, and the outputs.

config -> global adapter init -> [sites train with DP -> FFA aggregation] x rounds
       -> per-round adapters -> merged model + privacy.json + summary.json + curves.png
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedslm import quiet
from fedslm.adapter import adapter_state, attach_lora
from fedslm.aggregation import FFALoRA
from fedslm.config import RunConfig, to_run_config
from fedslm.data.clinic import demo_question
from fedslm.export import export_merged
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.privacy import expected_rounds
from fedslm.reporting import RunRecorder
from fedslm.transport import from_record, to_record


def run_server(grid: Grid, cfg: RunConfig, echo=print) -> dict:
    quiet.silence_known_noise()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # we print our own round lines
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_config.json").write_text(json.dumps(to_run_config(cfg), indent=2))

    model_dir = resolve_model_dir(cfg.model)
    base, _ = load_base_model(model_dir)
    initial_adapter = adapter_state(attach_lora(base, cfg.lora, freeze_a=True))
    initial = to_record(initial_adapter, "float32")
    del base

    fed = cfg.federation
    per_round = max(1, math.ceil(fed.fraction_train * fed.sites))
    min_sites = fed.min_sites or per_round
    recorder = RunRecorder(
        run_dir, fed.rounds, meta={"strategy": cfg.strategy.name, "lora_r": str(cfg.lora.r)}, echo=echo
    )
    strategy = FFALoRA(
        recorder,
        expected_shapes={k: tuple(v.shape) for k, v in initial_adapter.items()},
        transport_dtype=fed.transport_dtype,
        fraction_train=fed.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=min_sites,
        min_evaluate_nodes=min_sites,
        min_available_nodes=min_sites,
    )
    echo(
        f"federation: {fed.sites} sites x {fed.rounds} rounds, strategy {cfg.strategy.name}, "
        f"LoRA r={cfg.lora.r}, {sum(v.numel() for v in initial_adapter.values()):,} trainable values per site, "
        + (f"DP target epsilon {cfg.privacy.epsilon} (delta {cfg.privacy.delta})" if cfg.privacy.enabled else "no DP")
    )

    # round 0: the base model's held-out loss at every site, the baseline for the curves
    replies = grid.send_and_receive(strategy.configure_evaluate(0, initial, ConfigRecord(), grid), timeout=fed.timeout_s)
    strategy.aggregate_evaluate(0, replies)

    result = strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=fed.rounds, timeout=fed.timeout_s,
        train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
    )
    final = from_record(result.arrays) if len(result.arrays) else initial_adapter

    privacy = privacy_report(cfg, recorder)
    (run_dir / "privacy.json").write_text(json.dumps(privacy, indent=2))
    extra = {
        "strategy": cfg.strategy.name,
        "delta": cfg.privacy.delta,
        "target_epsilon": cfg.privacy.epsilon if cfg.privacy.enabled else None,
        "privacy": privacy["level"],
        "model": str(model_dir),
        "transport_dtype": fed.transport_dtype,
    }
    if cfg.export_model:
        prompts = [demo_question(cfg.seed)["prompt"], "What should I do about a cough?"]
        extra.update(export_merged(model_dir, cfg, final, run_dir / "model", prompts, privacy))
        echo(f"merged model written to {run_dir / 'model'} (max |logit diff| vs base+adapter {extra['merge_max_abs_diff']:.2e})")
    summary = recorder.summary(extra)
    recorder.plot(cfg.privacy.epsilon if cfg.privacy.enabled else None)
    return summary


def privacy_report(cfg: RunConfig, recorder: RunRecorder) -> dict:
    last: dict[int, dict] = {}
    for r in sorted(recorder.log):
        last.update(recorder.log[r].train)
    if not cfg.privacy.enabled:
        return {"level": "none", "rounds": cfg.federation.rounds, "sites": len(last)}
    return {
        "level": "sample",
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
