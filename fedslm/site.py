"""What one site does when a message arrives: load the global adapter, train or evaluate
on its own data, and reply with adapter tensors and metrics only.

The base model, tokenizer, LoRA wrapper and Opacus wrapper are built once per process
and reused for every round and every site that shares the process (in simulation, Ray
actors serve several sites). Per-site state that must persist (the privacy ledger) lives
in the node's `context.state`, never in the process.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedslm import quiet
from fedslm.adapter import adapter_state, attach_lora, load_adapter_state, set_base_delta
from fedslm.config import ConfigError, RunConfig, from_run_config, validate
from fedslm.data.canaries import canary_examples, make_canaries, write_audit_file
from fedslm.data.sites import SiteData, build_site_data, node_data_config
from fedslm.lora_schemes import SCHEMES, Scheme, make_scheme
from fedslm.model import cache_root, load_base_model, resolve_model_dir
from fedslm.privacy import PrivacyLedger, expected_rounds
from fedslm.train import DPContext, check_site_size, evaluate_loss, train_local, wrap_for_dp
from fedslm.transport import from_record, to_record

LEDGER_KEY = "fedslm.privacy"


@dataclass
class SiteRuntime:
    peft_model: torch.nn.Module
    tokenizer: object
    grad_sample_module: torch.nn.Module | None
    scheme: Scheme
    rank: int
    own_init: dict[str, torch.Tensor]  # this adapter's A and B as first built from the seed
    base_originals: dict[str, torch.Tensor] = field(default_factory=dict)  # stack: pristine W0
    datasets: dict = field(default_factory=dict)


_RUNTIMES: dict[tuple, SiteRuntime] = {}


def site_rank(cfg: RunConfig, context: Context, site: int) -> int:
    """This site's LoRA rank: its node config `lora-r`, else lora.site_ranks[site], else lora.r."""
    if "lora-r" in context.node_config:
        rank = int(context.node_config["lora-r"])
    elif cfg.lora.site_ranks:
        rank = cfg.lora.site_ranks[site]
    else:
        return cfg.lora.r
    if not 1 <= rank <= cfg.lora.r:
        raise ConfigError([f"lora-r: this site sets rank {rank}; it must be in [1, lora.r={cfg.lora.r}] (the global rank)"])
    if rank != cfg.lora.r and not SCHEMES[cfg.strategy.name].mixed_ranks:
        raise ConfigError([f"lora-r: this site sets rank {rank}, but strategy {cfg.strategy.name} needs every site at "
                           f"lora.r={cfg.lora.r}; heterogeneous ranks need strategy=exact or stack"])
    return rank


def runtime_for(cfg: RunConfig, rank: int | None = None) -> SiteRuntime:
    p = cfg.privacy
    rank = rank or cfg.lora.r
    key = (str(resolve_model_dir(cfg.model)), repr(cfg.lora), rank, cfg.strategy.name, p.enabled, p.grad_sample_mode,
           p.max_grad_norm)
    if key not in _RUNTIMES:
        quiet.silence_known_noise()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        model, tok = load_base_model(resolve_model_dir(cfg.model))
        lora = dataclasses.replace(cfg.lora, r=rank)
        peft_model = attach_lora(model, lora, freeze_a=not SCHEMES[cfg.strategy.name].trains_a)
        own_init = adapter_state(peft_model, trainable_only=False)
        # the site-side scheme only needs layer names, shapes and the global rank
        scheme = make_scheme(cfg.strategy.name, own_init, cfg.lora.r, cfg.lora.alpha)
        gsm = wrap_for_dp(peft_model, cfg.privacy) if cfg.privacy.enabled else None
        _RUNTIMES[key] = SiteRuntime(peft_model, tok, gsm, scheme, rank, own_init)
    return _RUNTIMES[key]


def load_global(rt: SiteRuntime, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """Make the site's model the global one (stack: merged into the base weights, fresh
    adapter on top); returns the trainable tensors as loaded."""
    g = from_record(arrays)
    delta = rt.scheme.base_delta(g)
    if delta is not None:
        set_base_delta(rt.peft_model, delta, rt.base_originals)
    start = rt.scheme.site_start(g, rt.rank, rt.own_init)
    load_adapter_state(rt.peft_model, start)
    return start


def site_data(cfg: RunConfig, context: Context, rt: SiteRuntime) -> SiteData:
    """This site's tokenised splits, built once per process. A SuperNode's own data
    (node config data-path) wins over the run's data config."""
    data_cfg, own = node_data_config(cfg.data, context.node_config)
    site = site_id(context)
    key = (site, repr(data_cfg), own)
    if key not in rt.datasets:
        data = build_site_data(data_cfg, site, cfg.federation.sites, rt.tokenizer, own,
                               extra_train=_canaries_for(cfg, context, site))
        print(
            f"site {site}: {len(data.train)} train / {len(data.eval)} held-out examples"
            f"{' (its own data)' if own else ''}, {data.train.truncated + data.eval.truncated} truncated "
            f"to {data_cfg.max_length} tokens, {data.train.dropped + data.eval.dropped} dropped (nothing left to learn)",
            flush=True,
        )
        rt.datasets[key] = data
    return rt.datasets[key]


def audit_dir(cfg: RunConfig, context: Context) -> Path:
    """Where a site writes its audit file: its node config `state-dir`, or (simulation,
    one machine) the run directory."""
    root = context.node_config.get("state-dir")
    return Path(str(root)) / f"run-{context.run_id}" if root else Path(cfg.output_dir) / "audit"


def _canaries_for(cfg: RunConfig, context: Context, site: int):
    p = cfg.privacy
    if not p.canaries or site != p.canary_site:
        return None
    canaries = make_canaries(p.canaries, cfg.seed)
    write_audit_file(audit_dir(cfg, context) / f"site-{site}-canaries.json", site, canaries, p.canary_repeats)
    return lambda columns: canary_examples(canaries, columns, p.canary_repeats)


def site_id(context: Context) -> int:
    """Simulation gives each node a partition id; a deployed SuperNode sets `site-id`."""
    for key in ("site-id", "partition-id"):
        if key in context.node_config:
            return int(context.node_config[key])
    raise KeyError(
        "this node has no site id: start the SuperNode with --node-config 'site-id=N' "
        "(simulation sets partition-id itself)"
    )


def site_label(context: Context) -> str:
    try:
        return f"site {site_id(context)}"
    except KeyError:
        return f"node {context.node_id}"


def config_for(context: Context, cfg: RunConfig | None) -> RunConfig:
    return cfg if cfg is not None else validate(from_run_config(context.run_config))


def ledger_file(cfg: RunConfig, context: Context, site: int, run_key: str | None = None) -> Path:
    """Where a site keeps its privacy ledger on its own disk (node config `state-dir`).
    The server's run key (kept in its checkpoint) names the run, so a coordinator that
    restarts and resumes under a new Flower run id continues the same ledger."""
    root = context.node_config.get("state-dir") or cache_root(cfg.model) / "ledgers"
    return Path(str(root)) / (f"run-{run_key}" if run_key else f"run-{context.run_id}") / f"site-{site}.json"


def load_ledger(cfg: RunConfig, context: Context, site: int, run_key: str | None = None) -> PrivacyLedger:
    """The node state holds the ledger between rounds; the file on the site's disk brings
    it back after the client process or the SuperNode restarts."""
    if LEDGER_KEY in context.state.config_records:
        return PrivacyLedger.from_json(str(context.state.config_records[LEDGER_KEY]["history"]))
    path = ledger_file(cfg, context, site, run_key)
    if path.exists():
        return PrivacyLedger.from_json(path.read_text())
    return PrivacyLedger()


def save_ledger(cfg: RunConfig, context: Context, site: int, ledger: PrivacyLedger, run_key: str | None = None) -> None:
    context.state.config_records[LEDGER_KEY] = ConfigRecord({"history": ledger.to_json()})
    path = ledger_file(cfg, context, site, run_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(ledger.to_json())
    tmp.replace(path)  # never a half-written ledger, which would under-count epsilon


def handle_train(msg: Message, context: Context, cfg: RunConfig, progress: bool = True) -> Message:
    site = site_id(context)
    rt = runtime_for(cfg, site_rank(cfg, context, site))
    data = site_data(cfg, context, rt)
    train_ds = data.train
    load_global(rt, msg.content["arrays"])
    server_round = int(msg.content["config"]["server-round"])
    run_key = str(msg.content["config"]["run-key"]) if "run-key" in msg.content["config"] else None

    dp, noise, rate = None, 0.0, 0.0
    eps = {"rdp": 0.0, "prv": 0.0}
    if cfg.privacy.enabled:
        ledger = load_ledger(cfg, context, site, run_key)
        plan = check_site_size(cfg.privacy, cfg.train, len(train_ds), expected_rounds(cfg.federation), site)
        # refuse before spending anything (raises BudgetExceededError with the numbers)
        ledger.check_budget(cfg.privacy, plan.noise_multiplier, plan.sample_rate, cfg.train.local_steps)
        dp, noise, rate = DPContext(cfg.privacy, plan, ledger), plan.noise_multiplier, plan.sample_rate

    bar = _StepBar(cfg, site, server_round) if progress and cfg.train.progress else None
    seed = hash((cfg.seed, site, server_round)) % (2**31)
    # Batches (Opacus's Poisson sampler inherits the loader's generator when secure_mode is
    # off) and DP noise use generators seeded inside train_local; LoRA dropout draws from
    # torch's global generator. Seeding that here, after the runtime is built (whose first
    # build consumes global draws), makes a round's update independent of what this
    # process ran before, so a fresh ClientApp process (deployment, a resumed run, another
    # Ray actor) trains exactly like a warm one
    torch.manual_seed(seed)
    stats = train_local(
        rt.peft_model,
        train_ds,
        cfg.train,
        pad_id=rt.tokenizer.pad_token_id,
        seed=seed,
        dp=dp,
        grad_sample_module=rt.grad_sample_module,
        progress=bar.step if bar else None,
        proximal_mu=cfg.strategy.proximal_mu,
    )
    if bar:
        bar.close()
    if stats.ledger is not None:
        save_ledger(cfg, context, site, stats.ledger, run_key)
        eps = {name: stats.ledger.epsilon(cfg.privacy.delta, name) for name in eps}

    metrics = MetricRecord(
        {
            "num-examples": len(train_ds),
            "site": site,
            "lora_r": rt.rank,
            "train_loss": stats.mean_loss if math.isfinite(stats.mean_loss) else -1.0,
            # the enforcing accountant's figure, and both accountants' for comparison
            "epsilon": eps[cfg.privacy.accountant],
            "epsilon_rdp": eps["rdp"],
            "epsilon_prv": eps["prv"],
            "noise_multiplier": noise,
            "sample_rate": rate,
            "steps_total": stats.ledger.steps if stats.ledger else stats.steps,
            "truncated": train_ds.truncated,
            "steps": stats.steps,
            "examples_seen": stats.examples_seen,
            "train_seconds": stats.seconds,
        }
    )
    arrays = to_record(adapter_state(rt.peft_model), cfg.federation.transport_dtype)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    site = site_id(context)
    rt = runtime_for(cfg, site_rank(cfg, context, site))
    eval_ds = site_data(cfg, context, rt).eval
    load_global(rt, msg.content["arrays"])
    loss = evaluate_loss(rt.peft_model, eval_ds, cfg.train.eval_batch_size, rt.tokenizer.pad_token_id)
    metrics = MetricRecord({"num-examples": len(eval_ds), "site": site, "eval_loss": loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


class _StepBar:
    """A local-steps bar. In simulation Ray forwards every refresh as a new line, so it
    refreshes at most every few seconds."""

    def __init__(self, cfg: RunConfig, site: int, server_round: int):
        from tqdm import tqdm

        self.bar = tqdm(
            total=cfg.train.local_steps,
            desc=f"round {server_round} site {site}",
            unit="step",
            leave=True,
            mininterval=5.0,
            ascii=True,
            dynamic_ncols=False,
            ncols=80,
            disable=os.environ.get("FEDSLM_NO_PROGRESS") == "1",
        )

    def step(self, loss: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
