"""`validate`: every value of a RunConfig checked at once, each problem named with its fix.

The allowed values of each set of choices are read from the module that implements them
(their registries), never restated here.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedslm.config.errors import ConfigError
from fedslm.config.flat import to_run_config
from fedslm.config.schema import RunConfig


def choices() -> dict[str, tuple[str, ...]]:
    """Each set of choices, as the module that implements it lists it (imported here, not
    at module level: a site that only parses its config need not load every implementation)."""
    from fedslm.data.records import LOSS_ON, SHAPES
    from fedslm.data.sites import PARTITIONERS
    from fedslm.lora.schemes import RULES, SCHEMES
    from fedslm.device import DEVICES, PRECISIONS
    from fedslm.model import QUANTIZE, SOURCES
    from fedslm.privacy.accounting import ACCOUNTANTS
    from fedslm.privacy.client_level import CLIPPING
    from fedslm.privacy.dp_step import GRAD_SAMPLE_MODES
    from fedslm.report.tracking import TRACKERS
    from fedslm.server.optimisers import SERVER_OPTIMISERS
    from fedslm.transport import DTYPES
    from fedslm.use.eval_data import SPLITS
    from fedslm.use.evaluate import TASKS

    return {
        "model.source": tuple(SOURCES),
        "model.quantize": tuple(QUANTIZE),
        "train.device": tuple(DEVICES),
        "train.precision": tuple(PRECISIONS),
        "data.shape": tuple(SHAPES),
        "data.loss_on": tuple(LOSS_ON),
        "data.partitioner": tuple(PARTITIONERS),
        "privacy.accountant": tuple(ACCOUNTANTS),
        "privacy.client_clipping": tuple(CLIPPING),
        "privacy.grad_sample_mode": tuple(GRAD_SAMPLE_MODES),
        "federation.transport_dtype": tuple(DTYPES),
        "strategy.name": tuple(SCHEMES),
        "strategy.aggregator": tuple(RULES),
        "strategy.server_optimizer": tuple(SERVER_OPTIMISERS),
        "server_eval.task": ("none", *TASKS),
        "server_eval.split": tuple(SPLITS),
        "tracking": tuple(TRACKERS),
    }


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value; raise one ConfigError naming each bad key and what is allowed."""
    problems: list[str] = []

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            problems.append(f"{key}: {msg}")

    flat = to_run_config(cfg)
    for key, allowed in choices().items():
        need(flat[key] in allowed, key, f"got {flat[key]!r}, allowed values: {', '.join(allowed)}")

    if cfg.model.source == "path" and not cfg.model.path:
        problems.append("model.path: required with model=local (model.source=path); add model.path=/dir/of/a/hf/model")
    if cfg.model.path:
        p = Path(cfg.model.path).expanduser()
        need(
            (p / "config.json").is_file(),
            "model.path",
            f"{str(p)!r} is not a Hugging Face model directory (no config.json); "
            "give a local directory saved with save_pretrained, or unset model.path",
        )
    t = cfg.model.tiny
    need(t.hidden_size % t.num_heads == 0, "model.tiny.hidden_size",
         f"must be divisible by model.tiny.num_heads ({t.num_heads})")
    need(t.num_heads % t.num_kv_heads == 0, "model.tiny.num_kv_heads",
         f"must divide model.tiny.num_heads ({t.num_heads})")

    need(cfg.lora.r >= 1, "lora.r", f"got {cfg.lora.r}, must be >= 1")
    need(cfg.lora.alpha > 0, "lora.alpha", f"got {cfg.lora.alpha}, must be > 0")
    need(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", f"got {cfg.lora.dropout}, must be in [0, 1)")
    from fedslm.data.sources import FILE_FORMATS
    from fedslm.lora.targets import ALIASES

    # names are checked against the model itself when LoRA is attached (fedslm.lora.targets)
    bad = [m for m in cfg.lora.target_modules if not str(m).isidentifier()]
    need(bool(cfg.lora.target_modules) and not bad, "lora.target_modules",
         f"got {bad or 'an empty list'}; give module names (q_proj, v_proj, ...) or one of: {', '.join(ALIASES)}")
    _validate_strategy(cfg, need, problems)
    need(not (cfg.model.quantize == "4bit" and cfg.strategy.name == "stack"), "model.quantize",
         "4bit cannot hold strategy=stack's per-round merges into the base weights; use strategy ffa, fedavg or exact")
    if cfg.privacy.grad_sample_mode == "ghost" and cfg.train.max_physical_batch:
        problems.append("train.max_physical_batch: not supported with privacy.grad_sample_mode=ghost; use hooks")
    if cfg.privacy.enabled and cfg.data.packing:
        # greedy packing shifts every later block when one document is removed, so one
        # record would touch many DP samples: the per-record guarantee would not hold
        problems.append("data.packing: not allowed with privacy.enabled=true (removing one record moves "
                        "every later block, so one record is not one DP sample); set data.packing=false")
    if cfg.privacy.enabled and cfg.lora.dropout > 0:
        problems.append("lora.dropout: must be 0 with privacy.enabled=true "
                        "(dropout masks differ per sample and are not accounted)")

    d = cfg.data
    need(d.train_examples >= 1, "data.train_examples", "must be >= 1")
    need(d.eval_examples >= 1, "data.eval_examples", "must be >= 1")
    need(d.max_length >= 16, "data.max_length", f"got {d.max_length}, must be >= 16")
    need(0 < d.eval_fraction < 1, "data.eval_fraction", f"got {d.eval_fraction}, must be in (0, 1)")
    need(d.max_examples >= 0, "data.max_examples", "must be >= 0 (0 = all)")
    need(d.alpha > 0, "data.alpha", f"got {d.alpha}, must be > 0")
    need(not d.packing or d.shape == "text", "data.packing", "only works with data.shape=text")
    need(d.loss_on != "label" or d.shape in ("instruction", "classification"), "data.loss_on",
         f"label needs rows with a label (shape instruction or classification), not shape={d.shape}")
    if d.partitioner in ("dirichlet", "natural", "natural_sample"):
        need(bool(d.partition_by), "data.partition_by",
             f"required with data.partitioner={d.partitioner} (the column to partition by, e.g. label or source)")
    for key in ("path", "eval_path", "labels_path"):
        value = getattr(d, key)
        if value and "://" not in value and not Path(value).expanduser().exists() and not (key == "path" and d.format and d.format not in FILE_FORMATS):
            problems.append(f"data.{key}: {value!r} does not exist; give an existing file or directory")
    need(not d.eval_path or bool(d.path), "data.eval_path", "needs data.path as well")

    need(cfg.train.local_steps >= 1, "train.local_steps", f"got {cfg.train.local_steps}, must be >= 1")
    ws = cfg.warm_start
    if ws.data is not None:
        need(cfg.strategy.name in ("ffa", "fedavg", "exact"), "warm_start.data",
             f"strategy {cfg.strategy.name} has no single global adapter to start from; use ffa, fedavg or exact")
        need(ws.epochs > 0 and ws.batch_size >= 1 and ws.lr > 0 and ws.max_examples >= 0, "warm_start",
             "epochs and lr must be > 0, batch_size >= 1, max_examples >= 0")
    need(cfg.lora.layers >= 0, "lora.layers", f"got {cfg.lora.layers}, must be >= 0 (0 = every layer)")
    need(cfg.train.local_epochs >= 0, "train.local_epochs", f"got {cfg.train.local_epochs}, must be >= 0 (0 = local_steps)")
    need(cfg.train.batch_size >= 1, "train.batch_size", f"got {cfg.train.batch_size}, must be >= 1")
    need(bool(d.path) or cfg.train.batch_size <= d.train_examples, "train.batch_size",
         f"got {cfg.train.batch_size}, must be <= data.train_examples ({cfg.data.train_examples})")
    need(cfg.train.lr > 0, "train.lr", f"got {cfg.train.lr}, must be > 0")
    need(cfg.train.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
    need(cfg.train.max_physical_batch >= 0, "train.max_physical_batch", "must be >= 0 (0 = no split)")
    need(cfg.train.threads >= 0, "train.threads", "must be >= 0 (0 = torch default)")

    p = cfg.privacy
    need(math.isfinite(p.epsilon) and p.epsilon > 0, "privacy.epsilon",
         f"got {p.epsilon}, must be a finite number > 0 (e.g. 1, 4, 8)")
    need(0 < p.delta < 1, "privacy.delta", f"got {p.delta}, must be in (0, 1), typically < 1/records")
    need(p.max_grad_norm > 0, "privacy.max_grad_norm", f"got {p.max_grad_norm}, must be > 0")
    need(p.max_noise_multiplier > 0, "privacy.max_noise_multiplier", "must be > 0")
    need(p.client_noise_multiplier > 0, "privacy.client_noise_multiplier", f"got {p.client_noise_multiplier}, must be > 0")
    need(p.client_clip_norm > 0, "privacy.client_clip_norm", f"got {p.client_clip_norm}, must be > 0")
    need(p.canaries >= 0, "privacy.canaries", "must be >= 0 (0 = no canaries)")
    need(0 <= p.canary_site < cfg.federation.sites, "privacy.canary_site",
         f"got {p.canary_site}, must be a site index in [0, {cfg.federation.sites - 1}]")
    need(p.canary_repeats >= 1, "privacy.canary_repeats", "must be >= 1")

    f = cfg.federation
    need(f.sites >= 1, "federation.sites", f"got {f.sites}, must be >= 1")
    need(f.rounds >= 1, "federation.rounds", f"got {f.rounds}, must be >= 1")
    need(0 < f.fraction_train <= 1, "federation.fraction_train", f"got {f.fraction_train}, must be in (0, 1]")
    need(0 < f.fraction_evaluate <= 1, "federation.fraction_evaluate", f"got {f.fraction_evaluate}, must be in (0, 1]")
    need(f.eval_every >= 1, "federation.eval_every",
         f"got {f.eval_every}, must be >= 1 (1 = every round; round 0 and the last round are always evaluated)")
    need(f.eval_limit >= 0, "federation.eval_limit", f"got {f.eval_limit}, must be >= 0 (0 = every held-out row)")
    need(0 <= f.sites_per_round <= f.sites, "federation.sites_per_round",
         f"got {f.sites_per_round}, must be in [0, federation.sites={f.sites}] (0 = use fraction_train)")
    need(0 <= f.min_sites <= f.sites, "federation.min_sites",
         f"got {f.min_sites}, must be in [0, federation.sites={f.sites}] (0 = all)")
    need(f.cpus_per_site > 0, "federation.cpus_per_site", "must be > 0")
    need(f.ray_cpus >= 0, "federation.ray_cpus", "must be >= 0 (0 = all cores)")
    need(f.gpus_per_site == -1 or 0 <= f.gpus_per_site <= 1, "federation.gpus_per_site",
         f"got {f.gpus_per_site}, must be a share of one GPU in [0, 1] (0.25: four sites per GPU) or -1 (auto)")
    need(f.ray_address is None or bool(str(f.ray_address).strip()), "federation.ray_address",
         "give the cluster's head as HOST:PORT (or auto), or leave it unset for a private Ray instance")
    need(f.timeout_s > 0, "federation.timeout_s", "must be > 0")
    need(cfg.server_eval.limit >= 0, "server_eval.limit", "must be >= 0 (0 = all)")
    # whether output_dir holds a run to continue is the server's check (sites validate
    # this config too, and never see the coordinator's disk)
    need(not cfg.resume or bool(cfg.output_dir), "resume", "needs output_dir: the directory of the run to continue")

    if problems:
        raise ConfigError(problems)
    return cfg


def _validate_strategy(cfg: RunConfig, need, problems: list[str]) -> None:
    st, lora = cfg.strategy, cfg.lora
    need(0 <= st.trim_fraction < 0.5, "strategy.trim_fraction", f"got {st.trim_fraction}, must be in [0, 0.5)")
    need(st.server_lr > 0, "strategy.server_lr", f"got {st.server_lr}, must be > 0")
    need(0 <= st.server_momentum < 1, "strategy.server_momentum", f"got {st.server_momentum}, must be in [0, 1)")
    need(0 <= st.beta_1 < 1 and 0 <= st.beta_2 < 1, "strategy.beta_1/beta_2", "must be in [0, 1)")
    need(st.tau > 0, "strategy.tau", f"got {st.tau}, must be > 0")
    need(st.proximal_mu >= 0, "strategy.proximal_mu", f"got {st.proximal_mu}, must be >= 0 (0 = off)")
    need(st.max_norm_ratio == 0 or st.max_norm_ratio >= 1, "strategy.max_norm_ratio",
         f"got {st.max_norm_ratio}, must be >= 1 (0 = off)")
    from fedslm.lora.schemes import SCHEMES

    scheme = SCHEMES.get(st.name)
    if scheme is None:  # already reported by validate's choices
        return
    fixed = scheme.fixed_coordinates
    if lora.site_ranks:
        need(len(lora.site_ranks) == cfg.federation.sites, "lora.site_ranks",
             f"has {len(lora.site_ranks)} ranks for federation.sites={cfg.federation.sites}; give one per site")
        need(all(1 <= r <= lora.r for r in lora.site_ranks), "lora.site_ranks",
             f"got {lora.site_ranks}; each must be in [1, lora.r={lora.r}] (lora.r is the global rank)")
        need(not fixed or all(r == lora.r for r in lora.site_ranks), "lora.site_ranks",
             f"strategy {st.name} averages one shared shape, so every site must train rank lora.r={lora.r}; "
             "heterogeneous ranks need strategy=exact or strategy=stack")
    need(st.server_optimizer == "none" or fixed, "strategy.server_optimizer",
         f"{st.server_optimizer} steps a fixed set of arrays, but strategy {st.name} re-factors (exact) or grows "
         "(stack) the adapter each round; use strategy=ffa or fedavg, or server_optimizer=none")
    need(st.aggregator in scheme.robust_rules, "strategy.aggregator",
         f"{st.aggregator} has no stacked form (stack keeps every factor exactly); use strategy=exact or ffa")
    need(not cfg.privacy.client_level or fixed, "privacy.client_level",
         f"Flower's DP wrappers clip arrays of one fixed shape; strategy {st.name} has none; use strategy=ffa or fedavg")
