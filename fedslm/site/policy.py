"""A site's own privacy policy: what it accepts from any run, whatever the coordinator sends.

The coordinator chooses the run config; the site decides what happens to its data. A
deployed site reads its policy from its node config: `policy-file` names a local YAML
file whose keys are the fields below, and single node config keys (`max-epsilon=4`,
`state-dir=...`) override it. A site without a policy uses the defaults below (DP on,
epsilon <= 8 per run and for the life of its data set, delta <= 1e-5). A run that asks
for more is refused before any data is read, naming the setting and the site's limit.

Paths never come from the coordinator: where the site reads its model and data and keeps
its ledger are its own settings. Simulated sites build their policy from the Hydra config
(`for_simulation`) and go through the same checks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from fedslm.config import ConfigError, DataConfig, RunConfig
from fedslm.data.sites import NODE_DATA_KEYS
from fedslm.data.sources import private_dir


DATA_CACHE = "datasets"  # under the state dir


class PolicyError(ConfigError):
    """The run asks for something this site's policy does not allow."""

    def __init__(self, problems: list[str]):
        super().__init__(problems)
        self.args = ("this site's policy refuses the run:\n  - " + "\n  - ".join(problems),)


@dataclass
class SitePolicy:
    require_dp: bool = True
    max_epsilon: float = 8.0  # per run
    max_lifetime_epsilon: float = 8.0  # over every run on this data set, ever
    max_delta: float = 1e-5
    min_clip_norm: float = 1e-3
    max_clip_norm: float = 10.0
    # local work per round: logical batches of hundreds run in physical batches
    # (train.max_physical_batch), so the batch bound is about work, not memory
    max_batch_size: int = 1024
    max_local_steps: int = 64
    max_local_epochs: float = 10.0
    max_length: int = 1024
    # answering evaluate messages releases a held-out loss that epsilon does not cover
    # (named in privacy.json); a site may decline
    evaluate: bool = True
    allow_canaries: bool = False
    # the site's own places: its ledger and reply cache, its model cache, a local model
    state_dir: str = str(Path.home() / ".fedslm" / "state")
    cache_dir: str | None = None
    model_path: str | None = None
    # the site's own hardware (train.device / train.precision): what it has, not the
    # coordinator's choice; None takes the run's (auto: a GPU if the site has one)
    device: str | None = None
    precision: str | None = None
    # the site's own data settings (DataConfig fields: path, format, shape, columns,
    # templates, eval_fraction, ...); the run's data.* keys never reach a deployed site's data
    data: dict = field(default_factory=dict)
    # simulation only: the run's data config is the simulated sites' data
    simulated: bool = False

    @classmethod
    def from_node_config(cls, node_config: dict) -> "SitePolicy":
        values: dict = {}
        if "policy-file" in node_config:
            values.update(_read_policy_file(Path(str(node_config["policy-file"]))))
        names = {f.name for f in fields(cls)} - {"data", "simulated"}
        for key, value in node_config.items():
            name = str(key).replace("-", "_")
            if name in names:
                values[name] = value
        data = dict(values.pop("data", {}) or {})
        for key, name in NODE_DATA_KEYS.items():
            if key in node_config:
                data[name] = str(node_config[key])
        return _typed(cls, values, data)

    @classmethod
    def for_simulation(cls, cfg: RunConfig, node_config: dict | None = None) -> "SitePolicy":
        """The policy the Hydra config implies for every simulated site: exactly what the
        run asks for, ledgers in the run directory (or privacy.ledger_dir), so running the
        demo twice never refuses."""
        p, t = cfg.privacy, cfg.train
        state = p.ledger_dir or str(Path(cfg.output_dir or ".") / "ledgers")
        own = cls.from_node_config(node_config).data if node_config else {}
        return cls(require_dp=p.enabled, max_epsilon=p.epsilon, max_lifetime_epsilon=p.epsilon if p.enabled else math.inf,
                   max_delta=p.delta, min_clip_norm=p.max_grad_norm, max_clip_norm=p.max_grad_norm,
                   max_batch_size=t.batch_size, max_local_steps=t.local_steps, max_local_epochs=t.local_epochs,
                   max_length=cfg.data.max_length,
                   evaluate=True, allow_canaries=True, state_dir=state, cache_dir=cfg.model.cache_dir,
                   model_path=cfg.model.path, data=own, simulated=True)

    def refusals(self, cfg: RunConfig) -> list[str]:
        """Every setting of the run that this policy does not allow, each with the limit."""
        p, t = cfg.privacy, cfg.train
        out = []

        def limit(ok: bool, setting: str, value, rule: str) -> None:
            if not ok:
                out.append(f"{setting}={value}: {rule} (site policy)")

        limit(p.enabled or not self.require_dp, "privacy.enabled", p.enabled, "this site trains only with DP")
        if p.enabled:
            limit(p.epsilon <= self.max_epsilon, "privacy.epsilon", p.epsilon, f"this site allows at most {self.max_epsilon} per run")
            limit(p.delta <= self.max_delta, "privacy.delta", p.delta, f"this site allows at most {self.max_delta}")
            limit(self.min_clip_norm <= p.max_grad_norm <= self.max_clip_norm, "privacy.max_grad_norm", p.max_grad_norm,
                  f"this site allows [{self.min_clip_norm}, {self.max_clip_norm}]")
        limit(t.batch_size <= self.max_batch_size, "train.batch_size", t.batch_size, f"this site allows at most {self.max_batch_size}")
        if t.local_epochs > 0:
            limit(t.local_epochs <= self.max_local_epochs, "train.local_epochs", t.local_epochs,
                  f"this site allows at most {self.max_local_epochs} per round")
        else:
            limit(t.local_steps <= self.max_local_steps, "train.local_steps", t.local_steps,
                  f"this site allows at most {self.max_local_steps}")
        limit(cfg.data.max_length <= self.max_length, "data.max_length", cfg.data.max_length,
              f"this site allows at most {self.max_length}")
        limit(not p.canaries or self.allow_canaries, "privacy.canaries", p.canaries,
              "this site does not put audit canaries into its data")
        return out

    def site_config(self, cfg: RunConfig) -> RunConfig:
        """The config this site trains with: the run's, refused if it breaks the policy,
        with the site's own paths and (deployed) its own data settings."""
        problems = self.refusals(cfg)
        if problems:
            raise PolicyError(problems)
        cfg = dataclasses.replace(cfg)
        cfg.model = dataclasses.replace(cfg.model, cache_dir=self.cache_dir, path=self.model_path)
        cfg.train = dataclasses.replace(cfg.train, device=self.device or cfg.train.device,
                                        precision=self.precision or cfg.train.precision)
        if cfg.model.source == "local" and not self.model_path:
            raise PolicyError(["model.source=local: this site has no model of its own; start the SuperNode with "
                               "--node-config 'model-path=\"/models/your-model\"' (paths never come from the coordinator)"])
        if not self.simulated:
            # the Arrow and tokenised copies of the site's rows stay in its state dir,
            # owner-only, where `fedslm forget` finds them (not in ~/.cache/huggingface)
            cfg.data = dataclasses.replace(site_data_config(cfg.data, self.data),
                                           cache_dir=str(Path(self.state_dir) / DATA_CACHE))
            private_dir(Path(self.state_dir))
            cfg.output_dir, cfg.resume = "", False  # the coordinator's places, not the site's
        elif self.data:
            cfg.data = dataclasses.replace(cfg.data, **self.data)
        return cfg


def site_data_config(run: DataConfig, own: dict) -> DataConfig:
    """A deployed site's data settings are its own; only the token length (bounded by the
    policy) comes from the run. Without a data path the site has nothing to train on."""
    if not own.get("path"):
        raise PolicyError(["data: this site names no data of its own; start the SuperNode with "
                           "--node-config 'data-path=\"/your/file.jsonl\"' (the coordinator's data.path never reaches a site)"])
    known = {f.name for f in fields(DataConfig)} - {"cache_dir"}
    bad = sorted(set(own) - known)
    if bad:
        raise PolicyError([f"policy data: unknown keys {bad}; allowed: {', '.join(sorted(known))}"])
    return dataclasses.replace(DataConfig(), max_length=run.max_length, **own)


def _read_policy_file(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise PolicyError([f"policy-file: {path} does not exist; write the site's policy there or drop the key"])
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PolicyError([f"policy-file: {path} is not valid YAML ({err})"]) from None
    if not isinstance(values, dict):
        raise PolicyError([f"policy-file: {path} must hold a mapping of policy keys"])
    return values


def _typed(cls, values: dict, data: dict) -> SitePolicy:
    known = {f.name: f for f in fields(cls)}
    bad = sorted(set(values) - set(known))
    if bad:
        raise PolicyError([f"site policy: unknown keys {bad}; allowed: {', '.join(n for n in known if n != 'simulated')}"])
    base = cls()
    typed = {}
    for name, value in values.items():
        default = getattr(base, name)
        try:
            if isinstance(default, bool):
                typed[name] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            elif isinstance(default, (int, float)) and not isinstance(default, bool):
                typed[name] = type(default)(value)
            else:
                typed[name] = None if value in (None, "") else str(value)
        except (TypeError, ValueError):
            raise PolicyError([f"site policy {name}: {value!r} is not a {type(default).__name__}"]) from None
    return cls(**typed, data=data)


def forget(state_dir: Path) -> list[Path]:
    """Remove every cached copy of the site's data under its state dir (the `datasets`
    Arrow and tokenised files); the ledgers stay: what was spent stays spent."""
    cache = Path(state_dir) / DATA_CACHE
    removed = sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    return removed
