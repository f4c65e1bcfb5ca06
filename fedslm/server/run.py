"""The server side of a run, as named steps.

config -> `setup` (global adapter init, strategy, record, resume) -> `round_zero` (the
base model's held-out loss at every site) -> `rounds` (sites train with DP -> LoRA-aware
aggregation, checkpointed) -> `outputs` (privacy.json, merged model, summary, curves).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedslm import quiet
from fedslm.config import RunConfig, to_run_config
from fedslm.data.clinic import demo_question
from fedslm.lora.adapter import adapter_state, attach_lora
from fedslm.lora.schemes import Scheme, make_scheme
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.privacy.accounting import sites_per_round
from fedslm.privacy.client_level import with_client_level_dp
from fedslm.privacy.report import privacy_report
from fedslm.server.checkpoint import Checkpoint, ResumableRounds, new_run_key
from fedslm.server.evaluation import server_evaluate_fn
from fedslm.server.record import RunRecorder
from fedslm.server.strategy import LoraStrategy, SiteErrorsFirst, WrapperState, describe_strategy, strategy_for
from fedslm.server.warm_start import warm_start
from fedslm.transport import from_record, to_record
from fedslm.use.export import export_merged

# keys a resumed run may change: where and how it reports, and how long it waits for sites,
# not what it trains. min_sites only sets how many sites the strategy waits for before it
# samples (the per-round count and the DP calibration use federation.sites / per_round), so
# an operator who restarts the coordinator may ask it to wait for every site to reconnect.
WARM_START_FILE = "warm_start.json"  # what the public warm start trained on (privacy.json cites it)
RESUME_MAY_CHANGE = {"resume", "output_dir", "export_model", "demo_answer", "federation.timeout_s",
                     "federation.min_sites", "tracking", "verbose",
                     # where the sites run, not what they compute
                     "federation.ray_address", "federation.gpus_per_site", "federation.ray_cpus", "train.device"}


@dataclass
class ServerRun:
    """Everything the steps share."""

    cfg: RunConfig
    run_dir: Path
    model_dir: Path
    scheme: Scheme
    recorder: RunRecorder
    core: LoraStrategy  # fedslm's strategy (with any server optimiser)
    strategy: object  # what Flower drives: `core`, or a client-level DP wrapper around it
    run_key: str
    done: int  # rounds already completed (a resumed run)
    start_arrays: ArrayRecord
    start_adapter: dict


def run_server(grid: Grid, cfg: RunConfig, echo=print) -> dict:
    quiet.silence_known_noise()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # we print our own round lines
    run = setup(cfg, echo)
    if not run.done:
        round_zero(grid, run)
    final = rounds(grid, run)
    return outputs(run, final, echo)


def setup(cfg: RunConfig, echo=print) -> ServerRun:
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_to_resume(cfg, run_dir) if cfg.resume else None
    (run_dir / "run_config.json").write_text(json.dumps(to_run_config(cfg), indent=2))

    model_dir = resolve_model_dir(cfg.model)
    base, _ = load_base_model(model_dir)
    # every LoRA tensor at the global rank, from the seed all sites share
    scheme = make_scheme(cfg.strategy.name, adapter_state(attach_lora(base, cfg.lora, freeze_a=False)),
                         cfg.lora.r, cfg.lora.alpha)
    del base
    initial_adapter = scheme.initial_global()
    if cfg.warm_start.data is not None and not ckpt:
        # before any site is asked anything: public data only, written beside the run
        initial_adapter, warm = warm_start(cfg, model_dir, scheme, initial_adapter, echo)
        (run_dir / WARM_START_FILE).write_text(json.dumps(warm, indent=2))

    fed = cfg.federation
    per_round = sites_per_round(fed)
    min_sites = fed.min_sites or per_round
    recorder = RunRecorder(run_dir, fed.rounds, meta={"strategy": cfg.strategy.name, "lora_r": str(cfg.lora.r)},
                           echo=echo,
                           start="warm start on public data" if cfg.warm_start.data is not None else "base model",
                           tracking=cfg.tracking)
    core = strategy_for(cfg, scheme, recorder, per_round, min_sites)
    wrapped = with_client_level_dp(core, cfg, per_round)
    strategy = core if wrapped is core else SiteErrorsFirst(wrapped, core)
    run = ServerRun(cfg, run_dir, model_dir, scheme, recorder, core, strategy,
                    run_key=ckpt.run_key if ckpt else new_run_key(),  # names the sites' privacy ledgers
                    done=ckpt.server_round if ckpt else 0,
                    start_arrays=to_record(initial_adapter, "float32"), start_adapter=initial_adapter)
    if ckpt:
        run.start_arrays = ckpt.restore(checkpoint_parts(run))
        run.start_adapter = from_record(run.start_arrays)
    echo(
        f"federation: {fed.sites} sites x {fed.rounds} rounds ({per_round} training per round), "
        f"strategy {describe_strategy(cfg)}, LoRA r={cfg.lora.r}"
        + (f" (site ranks {cfg.lora.site_ranks})" if cfg.lora.site_ranks else "")
        + f", {sum(v.numel() for k, v in scheme.init.items() if scheme.trains_a or '.lora_B.' in k):,} trainable values per site, "
        + (f"DP target epsilon {cfg.privacy.epsilon} (delta {cfg.privacy.delta})" if cfg.privacy.enabled else "no DP")
    )
    if ckpt:
        echo(f"resuming {run_dir} after round {run.done}/{fed.rounds} (saved global adapter and server state)")
    return run


def checkpoint_parts(run: ServerRun) -> dict:
    """Everything with state across rounds, as the checkpoint saves and restores it."""
    parts = {"strategy": run.core, "record": run.recorder}
    if isinstance(run.strategy, SiteErrorsFirst):
        parts["client_dp"] = WrapperState(run.strategy.wrapper)
    return parts


def round_zero(grid: Grid, run: ServerRun) -> None:
    """The base model's held-out loss at every site: the baseline of the curves."""
    replies = grid.send_and_receive(run.strategy.configure_evaluate(0, run.start_arrays, ConfigRecord(), grid),
                                    timeout=run.cfg.federation.timeout_s)
    run.strategy.aggregate_evaluate(0, replies)


def rounds(grid: Grid, run: ServerRun) -> dict:
    """The remaining rounds through Flower's Strategy.start; returns the final global adapter."""
    fed = run.cfg.federation
    driver = ResumableRounds(run.strategy, checkpoint_parts(run), run.run_dir, run.run_key, run.done)
    result = driver.start(
        grid=grid, initial_arrays=run.start_arrays, num_rounds=fed.rounds - run.done, timeout=fed.timeout_s,
        train_config=ConfigRecord({"run-key": run.run_key}), evaluate_config=ConfigRecord(),
        evaluate_fn=server_evaluate_fn(run.cfg, run.scheme, run.model_dir, run.recorder),
    )
    return from_record(result.arrays) if len(result.arrays) else run.start_adapter


def outputs(run: ServerRun, final: dict, echo=print) -> dict:
    """privacy.json, the merged model with its card, summary.json and curves.png."""
    cfg = run.cfg
    rank, alpha, final_view = run.scheme.peft_view(final)
    warm_file = run.run_dir / WARM_START_FILE
    privacy = privacy_report(cfg, {r: rl.train for r, rl in run.recorder.log.items()},
                             {r: rl.eval for r, rl in run.recorder.log.items()},
                             json.loads(warm_file.read_text()) if warm_file.exists() else None)
    (run.run_dir / "privacy.json").write_text(json.dumps(privacy, indent=2))
    extra = {
        "strategy": cfg.strategy.name,
        "delta": cfg.privacy.delta,
        "target_epsilon": cfg.privacy.epsilon if cfg.privacy.enabled else None,
        "client_level_epsilon": (privacy.get("client_level") or {}).get("epsilon"),
        "privacy": privacy["level"],
        "model": str(run.model_dir),
        "transport_dtype": cfg.federation.transport_dtype,
        "global_rank": rank,
        "aggregation_error": max(run.core.errors.values(), default=None),
    }
    if cfg.export_model:
        prompts = [demo_question(cfg.seed)["prompt"], "What should I do about a cough?"]
        extra.update(export_merged(run.model_dir, cfg, final_view, rank, alpha, run.run_dir / "model", prompts, privacy))
        echo(f"merged model written to {run.run_dir / 'model'} (max |logit diff| vs base+adapter "
             f"{extra['merge_max_abs_diff']:.2e})")
    return run.recorder.finish(extra, cfg.privacy.epsilon if cfg.privacy.enabled else None)


def checkpoint_to_resume(cfg: RunConfig, run_dir: Path) -> Checkpoint:
    """The saved state of the run in run_dir, refusing one saved under another config
    (its rounds would not continue the same run)."""
    ckpt = Checkpoint.load(run_dir)
    saved_path = run_dir / "run_config.json"
    if saved_path.exists():
        saved, now = json.loads(saved_path.read_text()), to_run_config(cfg)
        changed = sorted(k for k in set(saved) | set(now) if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k))
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
