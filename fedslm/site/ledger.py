"""A site's privacy ledger on its own disk: every round it ever trained, so epsilon
composes across client processes and coordinator restarts.

The ledger itself (the accountant's history and the budget check) is
fedslm.privacy.accounting.PrivacyLedger; this module says where a site keeps it.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context

from fedslm.atomic import write_atomic
from fedslm.config import RunConfig
from fedslm.model import cache_root
from fedslm.privacy.accounting import PrivacyLedger

# the node state key (a name, kept as it was: a running SuperNode's state carries it)
LEDGER_KEY = "fedslm.privacy"


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
    write_atomic(ledger_file(cfg, context, site, run_key), ledger.to_json())
