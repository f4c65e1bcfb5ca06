"""A site's lifetime privacy ledger: one file per data set on the site's own disk, holding
every round it ever trained on that data, in every run.

The ledger is keyed by a fingerprint of the data, not by anything the coordinator chooses:
a new run, a rerun after a crash and every job of a sweep spend from the same budget
(Papernot and Steinke 2022: tuning on private data spends privacy too). Within it, each
run (the server's run key) keeps its own accountant history, so a run's epsilon and the
lifetime epsilon are both known. The file is written atomically and fsync'ed; one that
cannot be read stops the site: a ledger never silently resets to zero.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from fedslm.atomic import write_atomic
from fedslm.config import DataConfig, PrivacyConfig
from fedslm.privacy.accounting import BudgetExceededError, PrivacyLedger

# a run key names files on the site's disk: nothing that could leave the state dir
RUN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
# the lifetime budget is the site's, not the run's: one accountant for every run, the
# tighter of Opacus's two (a run enforced with rdp composes below its rdp figure here)
LIFETIME_ACCOUNTANT = "prv"


class LedgerError(RuntimeError):
    """The site's ledger cannot be read or the run key cannot name a ledger entry."""


def check_run_key(run_key: str) -> str:
    if not RUN_KEY.fullmatch(run_key):
        raise LedgerError(f"run key {run_key[:80]!r} refused: a run key is 1-64 letters, digits, '-' or '_' "
                          "(it names entries in the site's ledger)")
    return run_key


def data_fingerprint(data: DataConfig, site: int, num_sites: int, own: bool) -> str:
    """What identifies a site's data set: the bytes of its own files, or (simulated sites
    cut from one source) the data settings and the site's share of it."""
    if own:
        paths = [p for p in (data.path, data.eval_path) if p]
        return _files_digest(tuple((p, os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths))
    described = json.dumps({"data": asdict(data), "site": site, "sites": num_sites}, sort_keys=True, default=str)
    return hashlib.sha256(described.encode()).hexdigest()


@lru_cache(maxsize=16)
def _files_digest(stamped: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for path, _, _ in stamped:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class SiteLedger:
    path: Path
    fingerprint: str
    runs: dict[str, list] = field(default_factory=dict)  # run key -> accountant history
    evaluations: dict[str, list[int]] = field(default_factory=dict)  # run key -> rounds evaluated
    trained: dict[str, list[int]] = field(default_factory=dict)  # run key -> rounds trained

    @classmethod
    def open(cls, state_dir: str | Path, fingerprint: str) -> "SiteLedger":
        path = Path(state_dir) / f"ledger-{fingerprint[:24]}.json"
        if not path.exists():
            return cls(path, fingerprint)
        try:
            saved = json.loads(path.read_text())
            runs = {k: PrivacyLedger([tuple(h) for h in v]).history for k, v in saved["runs"].items()}
            return cls(path, saved["fingerprint"], runs,
                       {k: list(v) for k, v in saved.get("evaluations", {}).items()},
                       {k: list(v) for k, v in saved.get("trained", {}).items()})
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerError(f"the privacy ledger {path} cannot be read ({type(err).__name__}: {err}); this site "
                              "stops rather than start again from zero. Restore the file from a backup") from None

    def run(self, run_key: str) -> PrivacyLedger:
        return PrivacyLedger(list(self.runs.get(run_key, [])))

    def lifetime(self) -> PrivacyLedger:
        return PrivacyLedger([h for history in self.runs.values() for h in history])

    def check_lifetime(self, limit: float, delta: float, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        after = self.lifetime().with_round(noise_multiplier, sample_rate, steps).epsilon(delta, LIFETIME_ACCOUNTANT)
        if after > limit * (1 + 1e-9):
            spent = self.lifetime().epsilon(delta, LIFETIME_ACCOUNTANT)
            raise BudgetExceededError(
                f"lifetime privacy budget of this data set exhausted: {len(self.runs)} run(s) spent epsilon "
                f"{spent:.3f}, another round would reach {after:.3f} > the site's max_lifetime_epsilon {limit} "
                f"(delta={delta}); this site refuses to train. `fedslm ledger {self.path.parent}` lists the runs"
            )
        return after

    def record_round(self, run_key: str, server_round: int, ledger: PrivacyLedger) -> None:
        """`ledger`: the run's whole history after this round (Opacus merges equal steps)."""
        self.runs[run_key] = [list(h) for h in ledger.history]
        self.trained.setdefault(run_key, []).append(server_round)
        self._save()

    def record_evaluation(self, run_key: str, server_round: int) -> None:
        """One held-out loss per round: a second evaluate of the same round is refused."""
        done = self.evaluations.setdefault(run_key, [])
        if server_round in done:
            raise LedgerError(f"round {server_round} of run {run_key} was already evaluated here; a site answers "
                              "one evaluation per round (each is a release of its held-out data)")
        done.append(server_round)
        self._save()

    def _save(self) -> None:
        body = json.dumps({"fingerprint": self.fingerprint, "runs": self.runs, "trained": self.trained,
                           "evaluations": self.evaluations}, indent=1)
        write_atomic(self.path, body, durable=True)


def describe(state_dir: Path, delta: float = PrivacyConfig.delta) -> str:
    """What `fedslm ledger STATE_DIR` prints: every data set, every run, what it spent."""
    files = sorted(Path(state_dir).glob("ledger-*.json"))
    if not files:
        return f"no ledger in {state_dir} (a site writes ledger-<data fingerprint>.json there when it first trains)"
    lines = []
    for f in files:
        led = SiteLedger.open(state_dir, f.name[len("ledger-"):-len(".json")])
        lines.append(f"data set {led.fingerprint[:16]} ({f.name}): lifetime epsilon "
                     f"{led.lifetime().epsilon(delta, LIFETIME_ACCOUNTANT):.3f} at delta={delta:g}")
        for key, history in led.runs.items():
            run = PrivacyLedger([tuple(h) for h in history])
            lines.append(f"  run {key}: {len(led.trained.get(key, []))} round(s), {run.steps} DP steps, epsilon "
                         f"{run.epsilon(delta, LIFETIME_ACCOUNTANT):.3f}, {len(led.evaluations.get(key, []))} evaluation(s)")
    return "\n".join(lines)
