"""Each site's train and held-out splits.

Simulation: one table is split into sites with a flwr-datasets partitioner (IID,
Dirichlet over a label, natural by a column, or a seeded sample of the natural sites).
Deployment: a SuperNode's own file, named in its node config, is the whole site; the
server never sees the path or the rows, only the counts a site reports.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import datasets

from fedslm.config import DataConfig
from fedslm.data import clinic
from fedslm.data.errors import DataError
from fedslm.data.records import check_columns, check_labels, load_label_set, to_example
from fedslm.data.sources import load_table
from fedslm.data.tokenize import TokenizedDataset, tokenize_table

# data.partitioner: how one table becomes sites (the branches of _partition)
PARTITIONERS = ("iid", "dirichlet", "natural", "natural_sample")

# SuperNode --node-config keys a site sets for its own data (never sent to the server)
NODE_DATA_KEYS = {"data-path": "path", "data-format": "format", "data-eval-path": "eval_path"}


@dataclass
class SiteRows:
    """One site's raw rows before tokenisation, and what the per-site table shows."""

    site: int
    natural_id: str | None
    train: datasets.Dataset
    eval: datasets.Dataset


@dataclass
class SiteData:
    site: int
    natural_id: str | None
    train: TokenizedDataset
    eval: TokenizedDataset


def is_synthetic(cfg: DataConfig) -> bool:
    """No file and no builder: the built-in synthetic clinics."""
    return cfg.path is None and cfg.format is None


def system_prompt_for(cfg: DataConfig) -> str | None:
    """The system prompt training used, so that evaluation and audits score the same text."""
    return cfg.system_prompt or (clinic.SYSTEM_PROMPT if is_synthetic(cfg) else None)


@lru_cache(maxsize=8)
def _table(path: str | None, fmt: str | None, cache_dir: str | None = None) -> datasets.Dataset:
    return load_table(path, fmt, cache_dir)


def partition(table: datasets.Dataset, cfg: DataConfig, num_sites: int, site: int) -> tuple[datasets.Dataset, str | None]:
    """This site's rows of a shared table, and its natural id when there is one."""
    # flwr-datasets draws a tqdm bar (on stderr) for every index it builds: one noise
    # line per site; exceptions still propagate
    with contextlib.redirect_stderr(io.StringIO()):
        return _partition(table, cfg, num_sites, site)


def _partition(table: datasets.Dataset, cfg: DataConfig, num_sites: int, site: int) -> tuple[datasets.Dataset, str | None]:
    if not 0 <= site < num_sites:
        raise DataError(f"site {site} is outside 0..{num_sites - 1}")
    if cfg.partition_by and cfg.partition_by not in table.column_names:
        raise DataError(f"data.partition_by={cfg.partition_by!r} is not a column; the data has {', '.join(table.column_names)}")
    # flwr-datasets (with matplotlib, about a second) only when a table is partitioned:
    # the built-in synthetic clinics and a site's own data never need it
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if cfg.partitioner == "iid":
        # flwr-datasets' IID partitioner cuts contiguous shards; shuffle first so that a
        # file sorted by label still gives each site the same mix
        p = IidPartitioner(num_partitions=num_sites)
        p.dataset = table.shuffle(seed=cfg.seed)
        return p.load_partition(site), None
    if cfg.partitioner == "dirichlet":
        p = DirichletPartitioner(num_partitions=num_sites, partition_by=cfg.partition_by, alpha=cfg.alpha,
                                 seed=cfg.seed, min_partition_size=0)
        p.dataset = table
        return p.load_partition(site), None
    p = NaturalIdPartitioner(partition_by=cfg.partition_by)
    p.dataset = table
    n_natural = p.num_partitions
    if cfg.partitioner == "natural":
        if n_natural != num_sites:
            raise DataError(
                f"data.partitioner=natural gives one site per value of {cfg.partition_by!r}: {n_natural} sites, "
                f"but federation.sites={num_sites}; set federation.sites={n_natural}, or "
                f"data.partitioner=natural_sample to draw {num_sites} of them"
            )
        index = site
    else:
        if num_sites > n_natural:
            raise DataError(f"data.partitioner=natural_sample: federation.sites={num_sites} > {n_natural} values of {cfg.partition_by!r}")
        index = natural_sample(n_natural, num_sites, cfg.seed)[site]
    return p.load_partition(index), str(p.partition_id_to_natural_id[index])


def natural_sample(n_natural: int, num_sites: int, seed: int) -> list[int]:
    return sorted(random.Random(f"natural_sample|{seed}").sample(range(n_natural), num_sites))


def site_rows(cfg: DataConfig, site: int, num_sites: int, own_data: bool = False) -> SiteRows:
    """Raw train/eval rows of one site (before tokenisation)."""
    if is_synthetic(cfg):
        train, held = clinic.site_splits(site, cfg.train_examples, cfg.eval_examples, cfg.seed)
        return SiteRows(site, clinic.site_profile(site).name, datasets.Dataset.from_list(train), datasets.Dataset.from_list(held))
    where = "site data" if own_data else f"data.path ({cfg.path})"
    table = _table(cfg.path, cfg.format, cfg.cache_dir)
    check_columns(table, cfg, where)
    if own_data:
        rows, natural = table, None
    else:
        rows, natural = partition(table, cfg, num_sites, site)
    if cfg.eval_path:
        eval_table = _table(cfg.eval_path, cfg.format, cfg.cache_dir)
        check_columns(eval_table, cfg, f"data.eval_path ({cfg.eval_path})")
        if own_data:
            held = eval_table
        elif natural is not None:
            held = eval_table.filter(lambda v: str(v) == natural, input_columns=cfg.partition_by)
        else:
            held, _ = partition(eval_table, cfg, num_sites, site)
        train = rows
    else:
        if len(rows) < 2:
            raise DataError(f"site {site} has {len(rows)} example(s): too few to hold out an eval split; it needs at least 2")
        split = rows.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        train, held = split["train"], split["test"]
    if cfg.max_examples:
        # a quick run caps the held-out split in proportion, so evaluation stays quick too
        eval_cap = max(1, round(cfg.max_examples * cfg.eval_fraction / (1 - cfg.eval_fraction)))
        if len(train) > cfg.max_examples:
            train = train.shuffle(seed=cfg.seed).select(range(cfg.max_examples))
        if len(held) > eval_cap:
            held = held.shuffle(seed=cfg.seed).select(range(eval_cap))
    if len(train) == 0:
        raise DataError(f"site {site} has no training examples after partitioning; use fewer sites or another partitioner")
    return SiteRows(site, natural, train, held)


def build_site_data(cfg: DataConfig, site: int, num_sites: int, tokenizer, own_data: bool = False,
                    extra_train: Callable[[list[str]], datasets.Dataset] | None = None) -> SiteData:
    """Tokenised splits of one site. `extra_train(columns)` may add examples (audit
    canaries) in the shape of the site's examples table, to the training split only."""
    rows = site_rows(cfg, site, num_sites, own_data)
    labels = load_label_set(cfg)
    for name, split in (("train", rows.train), ("eval", rows.eval)):
        check_labels(split, cfg, labels, f"site {site} {name} split")
    system_prompt = system_prompt_for(cfg)

    def tokenized(split: datasets.Dataset, extra=None) -> TokenizedDataset:
        examples = split.map(lambda r: to_example(r, cfg, labels), remove_columns=split.column_names, desc="formatting")
        if extra is not None:
            added = extra(examples.column_names)
            if len(added):
                examples = datasets.concatenate_datasets([examples, added.cast(examples.features)]).shuffle(seed=cfg.seed)
        return tokenize_table(tokenizer, examples, cfg.max_length, system_prompt, packing=cfg.packing,
                              loss_on=cfg.loss_on)

    return SiteData(site, rows.natural_id, tokenized(rows.train, extra_train), tokenized(rows.eval))


def site_table(cfg: DataConfig, num_sites: int) -> list[dict]:
    """Per-site sizes and label mix, for the table printed at the start of a simulation."""
    label_col = "topic" if is_synthetic(cfg) else cfg.label_column
    rows_out = []
    for site in range(num_sites):
        rows = site_rows(cfg, site, num_sites)
        mix = ""
        if label_col and label_col in rows.train.column_names:
            counts = Counter(str(v) for v in rows.train[label_col])
            total = sum(counts.values())
            mix = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in counts.most_common(3))
            if len(counts) > 3:
                mix += f" (+{len(counts) - 3} more)"
        rows_out.append({"site": site, "natural_id": rows.natural_id, "train": len(rows.train),
                         "eval": len(rows.eval), "label_mix": mix})
    return rows_out


def format_site_table(rows: list[dict]) -> str:
    lines = [f"{'site':>4}  {'name':<32} {'train':>7} {'eval':>6}  label mix (top 3)"]
    for r in rows:
        lines.append(f"{r['site']:>4}  {str(r['natural_id'] or '-')[:32]:<32} {r['train']:>7} {r['eval']:>6}  {r['label_mix']}")
    return "\n".join(lines)
