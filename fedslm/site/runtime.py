"""The per-process state of a site: base model, tokenizer, LoRA and Opacus wrappers, and
the tokenised splits, built once per process and reused for every round and every site
that shares the process (in simulation, Ray actors serve several sites).

What must outlive the process (the privacy ledger) lives in fedslm.site.ledger, never here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context

from fedslm import quiet
from fedslm.config import ConfigError, RunConfig, from_run_config, validate
from fedslm.data.canaries import canary_examples, make_canaries, write_audit_file
from fedslm.data.sites import SiteData, build_site_data
from fedslm.lora.adapter import a_digest, adapter_state, attach_lora, load_adapter_state, set_base_delta
from fedslm.lora.frozen_prefix import CachedStates, first_trained_layer
from fedslm.lora.schemes import SCHEMES, Scheme, make_scheme
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.privacy.dp_step import wrap_for_dp
from fedslm.rundir import check_shared
from fedslm.site.policy import SitePolicy
from fedslm.site.progress import site_progress
from fedslm.transport import from_record


@dataclass
class SiteRuntime:
    peft_model: torch.nn.Module
    tokenizer: object
    privacy: object  # the PrivacyConfig the runtime was built for
    scheme: Scheme
    rank: int
    own_init: dict[str, torch.Tensor]  # this adapter's A and B as first built from the seed
    a_digest: int  # FFA: the fingerprint of its frozen A the replies carry (0 when A trains)
    base_originals: dict[str, torch.Tensor] = field(default_factory=dict)  # stack: pristine W0
    datasets: dict = field(default_factory=dict)
    prefix_states: dict = field(default_factory=dict)  # (site, data, own, split) -> CachedStates
    _dp_module: torch.nn.Module | None = None

    @property
    def grad_sample_module(self) -> torch.nn.Module | None:
        """The Opacus wrapper, built when a private round first needs it: an evaluate
        message (a fresh process in deployment) never imports Opacus."""
        if self._dp_module is None and self.privacy.enabled:
            self._dp_module = wrap_for_dp(self.peft_model, self.privacy)
        return self._dp_module


_RUNTIMES: dict[tuple, SiteRuntime] = {}
PREFIX_CACHE_DIR = ".prefix-cache"  # in a simulation's run directory, removed when it ends


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
    t = cfg.train
    key = (str(resolve_model_dir(cfg.model)), repr(cfg.lora), rank, cfg.strategy.name, p.enabled, p.grad_sample_mode,
           p.max_grad_norm, t.device, t.precision, cfg.model.quantize)
    if key not in _RUNTIMES:
        quiet.silence_known_noise()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        model, tok = load_base_model(resolve_model_dir(cfg.model), t.device, t.precision, cfg.model.quantize)
        lora = dataclasses.replace(cfg.lora, r=rank)
        peft_model = attach_lora(model, lora, freeze_a=not SCHEMES[cfg.strategy.name].trains_a)
        own_init = adapter_state(peft_model, trainable_only=False)
        # the site-side scheme only needs layer names, shapes and the global rank
        scheme = make_scheme(cfg.strategy.name, own_init, cfg.lora.r, cfg.lora.alpha)
        _RUNTIMES[key] = SiteRuntime(peft_model, tok, cfg.privacy, scheme, rank, own_init,
                                     0 if scheme.trains_a else a_digest(own_init))
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


def site_data(cfg: RunConfig, context: Context, rt: SiteRuntime, own: bool) -> SiteData:
    """This site's tokenised splits, built once per process. `cfg` is the site's config
    (fedslm.site.policy): a deployed site's data settings are its own (`own`)."""
    site = site_id(context)
    data_cfg = cfg.data
    key = (site, repr(data_cfg), own)
    if key not in rt.datasets:
        data = build_site_data(data_cfg, site, cfg.federation.sites, rt.tokenizer, own,
                               extra_train=_canaries_for(cfg, context, site))
        site_progress(cfg, context).say(
            f"site {site}: {len(data.train)} train / {len(data.eval)} held-out examples"
            f"{' (its own data)' if own else ''}, {data.train.truncated + data.eval.truncated} truncated "
            f"to {data_cfg.max_length} tokens, {data.train.dropped + data.eval.dropped} dropped (nothing left to learn)")
        rt.datasets[key] = data
    return rt.datasets[key]


def site_split(cfg: RunConfig, context: Context, rt: SiteRuntime, own: bool, split: str,
               shared_dir: Path | None = None):
    """One split ("train" or "eval") as the site trains or scores it: with a frozen prefix
    (lora.layers), each record's frozen-layer output is computed on the split's first use
    and reused by every later step, epoch and round this process serves. `shared_dir`
    (simulation: one machine, many processes each serving any site) keeps it on disk too,
    so the next process that serves the site loads it instead of computing it again."""
    data = site_data(cfg, context, rt, own)
    first = first_trained_layer(rt.peft_model)
    if not first:
        return getattr(data, split)
    key = (data.site, repr(cfg.data), own, split)
    if key not in rt.prefix_states:
        start, tokens = time.perf_counter(), getattr(data, split)
        name = hashlib.sha256(repr((str(resolve_model_dir(cfg.model)), first, key)).encode()).hexdigest()[:24]
        path = shared_dir / f"{name}.safetensors" if shared_dir else None
        if path is not None and path.exists():
            rt.prefix_states[key] = CachedStates.load(path, tokens)
            how = "loaded"
        else:
            rt.prefix_states[key] = CachedStates.build(rt.peft_model, tokens, rt.tokenizer.pad_token_id,
                                                       cfg.train.eval_batch_size)
            if path is not None:
                rt.prefix_states[key].save(path)
            how = "cached"
        site_progress(cfg, context).say(f"site {data.site}: the {first} frozen layers' output {how} for {len(tokens)} "
                                        f"{split} rows in {time.perf_counter() - start:.1f}s")
    return rt.prefix_states[key]


def shared_prefix_dir(setup: SiteSetup) -> Path | None:
    """Where a simulation's processes share frozen-prefix states: inside the run directory,
    which the simulation removes when it ends. A deployed site keeps them in its process."""
    return Path(setup.cfg.output_dir) / PREFIX_CACHE_DIR if setup.policy.simulated else None


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


@dataclass
class SiteSetup:
    """What a site works with for one message: its config (the run's, checked against its
    policy, with its own paths and data), the policy, and whether the data is its own."""

    cfg: RunConfig
    policy: SitePolicy
    own_data: bool


def site_setup(context: Context, run: RunConfig | None) -> SiteSetup:
    """`run` is given by a simulation (the Hydra config); a deployed site gets None and
    reads the coordinator's run config, which its own policy then checks."""
    if run is None:
        run = from_run_config(context.run_config)
        deployed = "partition-id" not in context.node_config  # Flower's simulation engine sets it
    else:
        deployed = False
    if deployed:
        policy = SitePolicy.from_node_config(context.node_config)
    else:
        if run.federation.ray_address:  # a site process may be on another node of the cluster
            check_shared(Path(run.output_dir), "output_dir")
            if run.privacy.ledger_dir:
                check_shared(Path(run.privacy.ledger_dir), "privacy.ledger_dir")
        policy = SitePolicy.for_simulation(run, context.node_config)
    cfg = policy.site_config(run)
    validate(cfg)
    return SiteSetup(cfg, policy, own_data=deployed or bool(policy.data))
