"""The coordinator tries to change a site's privacy: a deployed site (no config of its own
from the run but its node config) refuses, naming the setting and its limit, before it
reads any data; paths and data settings never come from the coordinator; the budget lasts
the data set's lifetime, whatever run key the coordinator picks."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import _errors_as_replies
from fedslm.config import to_run_config
from fedslm.data.clinic import generate_site
from fedslm.privacy.accounting import BudgetExceededError
from fedslm.privacy.releases import DP_TRAIN_KEYS, EVAL_KEYS
from fedslm.site import runtime
from fedslm.site.handlers import handle_evaluate, handle_train
from fedslm.site.ledger import LedgerError
from fedslm.site.policy import PolicyError
from fedslm.transport import to_record

_RUN_IDS = itertools.count(9000)


@pytest.fixture
def site(tmp_path, tiny_cfg):
    """A deployed site's node config: its own data file, state dir and model cache."""
    data = tmp_path / "site-data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_site(0, 54, seed=0)))
    return {"site-id": 0, "data-path": str(data), "state-dir": str(tmp_path / "state"),
            "cache-dir": tiny_cfg.model.cache_dir}


def _message(cfg, kind="train", server_round=1, run_key="run-a") -> Message:
    g = runtime.runtime_for(cfg).scheme.initial_global()
    config = ConfigRecord({"server-round": server_round, "run-key": run_key})
    return Message(RecordDict({"arrays": to_record(g), "config": config}), dst_node_id=11, message_type=kind)


def _deployed(cfg, node_config: dict, **run_overrides) -> Context:
    run_config = to_run_config(cfg) | run_overrides
    return Context(run_id=next(_RUN_IDS), node_id=11, node_config=dict(node_config), state=RecordDict(),
                   run_config=run_config)


def test_a_run_within_the_policy_trains_on_the_sites_own_data(tiny_cfg, site, flower_identity, capsys):
    reply = handle_train(_message(tiny_cfg), _deployed(tiny_cfg, site), None, progress=False)
    metrics = reply.content.metric_records["metrics"]
    assert set(metrics) == set(DP_TRAIN_KEYS)  # nothing else leaves the site
    assert 0 < metrics["epsilon"] <= 8.0 and metrics["epsilon_lifetime"] == pytest.approx(metrics["epsilon"])
    assert "site 0: 48 train / 6 held-out examples (its own data)" in capsys.readouterr().out


@pytest.mark.parametrize("key,value,named", [
    ("privacy.enabled", False, "privacy.enabled=False: this site trains only with DP"),
    ("privacy.epsilon", 50.0, "privacy.epsilon=50.0: this site allows at most 8.0 per run"),
    ("privacy.delta", 0.01, "privacy.delta=0.01: this site allows at most 1e-05"),
    ("privacy.max_grad_norm", 1e6, "privacy.max_grad_norm=1000000.0: this site allows [0.001, 10.0]"),
    ("train.batch_size", 100_000, "train.batch_size=100000: this site allows at most 1024"),
    ("train.local_steps", 10_000, "train.local_steps=10000: this site allows at most 64"),
    ("train.local_epochs", 500.0, "train.local_epochs=500.0: this site allows at most 10.0 per round"),
    ("data.max_length", 100_000, "data.max_length=100000: this site allows at most 1024"),
    ("privacy.canaries", 4, "privacy.canaries=4: this site does not put audit canaries"),
])
def test_a_coordinator_cannot_loosen_the_sites_privacy(tiny_cfg, site, flower_identity, monkeypatch, key, value, named):
    def no_data(*_, **__):
        raise AssertionError("the site read its data before refusing")

    monkeypatch.setattr(runtime, "build_site_data", no_data)
    ctx = _deployed(tiny_cfg, site, **{key: value})
    with pytest.raises(PolicyError, match="site policy") as err:
        handle_train(_message(tiny_cfg), ctx, None, progress=False)
    assert named in str(err.value)
    # the error reply the server gets names the setting too; nothing was written at the site
    reply = _call(_message(tiny_cfg), ctx)
    assert reply.has_error() and named in reply.error.reason and "\n" not in reply.error.reason
    assert reply.error.reason.startswith("PolicyError: this site's policy refuses the run:")
    assert not Path(site["state-dir"]).exists()


def test_paths_and_data_settings_never_come_from_the_coordinator(tiny_cfg, site, flower_identity, tmp_path, capsys):
    """A run config naming another data file, other templates and columns, another model
    cache and output dir: the site trains on its own file, with its own settings."""
    decoy = tmp_path / "decoy.jsonl"
    decoy.write_text("".join(json.dumps({"prompt": "x", "answer": "y", "secret": "s"}) + "\n" for _ in range(500)))
    ctx = _deployed(tiny_cfg, site, **{"data.path": str(decoy), "data.prompt_template": "{secret}",
                                        "data.eval_fraction": 0.9, "model.cache_dir": str(tmp_path / "elsewhere"),
                                        "output_dir": str(tmp_path / "coordinator-out")})
    handle_train(_message(tiny_cfg), ctx, None, progress=False)
    out = capsys.readouterr().out
    assert "48 train / 6 held-out examples (its own data)" in out  # its 54 rows, its 10%
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "coordinator-out").exists()


def test_a_deployed_site_without_its_own_data_refuses(tiny_cfg, site, flower_identity):
    node = {k: v for k, v in site.items() if k != "data-path"}
    with pytest.raises(PolicyError, match="names no data of its own"):
        handle_train(_message(tiny_cfg), _deployed(tiny_cfg, node), None, progress=False)


def test_the_sites_policy_file_wins(tiny_cfg, site, flower_identity, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("max_epsilon: 4\nmax_lifetime_epsilon: 20\nevaluate: false\n")
    node = site | {"policy-file": str(policy)}
    with pytest.raises(PolicyError, match="privacy.epsilon=8.0: this site allows at most 4.0 per run"):
        handle_train(_message(tiny_cfg), _deployed(tiny_cfg, node), None, progress=False)
    with pytest.raises(PolicyError, match="does not release held-out losses"):
        handle_evaluate(_message(tiny_cfg, "evaluate"), _deployed(tiny_cfg, node, **{"privacy.epsilon": 4.0}), None)
    (tmp_path / "bad.yaml").write_text("max_epsilonn: 4\n")
    with pytest.raises(PolicyError, match=r"unknown keys \['max_epsilonn'\]"):
        handle_train(_message(tiny_cfg), _deployed(tiny_cfg, site | {"policy-file": str(tmp_path / "bad.yaml")}), None)


@pytest.mark.parametrize("run_key", ["../../../x", "a/b", "..", "x" * 65, ""])
def test_a_run_key_that_could_leave_the_state_dir_is_refused(tiny_cfg, site, flower_identity, tmp_path, run_key):
    with pytest.raises(LedgerError, match="run key .* refused"):
        handle_train(_message(tiny_cfg, run_key=run_key), _deployed(tiny_cfg, site), None, progress=False)
    assert not any(tmp_path.parent.glob("x")) and not (tmp_path / "x").exists()


def test_a_new_run_key_cannot_spend_past_the_lifetime_budget(tiny_cfg, site, flower_identity):
    """Each run targets epsilon 8; the site's lifetime budget (default 8 per data set) is
    spent by the first run, so a rerun under a fresh run key is refused, not reset."""
    for r in (1, 2):
        handle_train(_message(tiny_cfg, server_round=r, run_key="first"), _deployed(tiny_cfg, site), None, progress=False)
    with pytest.raises(BudgetExceededError, match="lifetime privacy budget of this data set exhausted"):
        handle_train(_message(tiny_cfg, run_key="second"), _deployed(tiny_cfg, site), None, progress=False)
    # a site that raises its lifetime budget may run again, and the ledger lists both runs
    more = site | {"max-lifetime-epsilon": 30}
    reply = handle_train(_message(tiny_cfg, run_key="second"), _deployed(tiny_cfg, more), None, progress=False)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["epsilon_lifetime"] > 8.0 > metrics["epsilon"]
    from fedslm.site.ledger import describe

    listing = describe(Path(site["state-dir"]))
    assert "run first: 2 round(s)" in listing and "run second: 1 round(s)" in listing


def test_an_unreadable_ledger_stops_the_site_and_is_never_reset(tiny_cfg, site, flower_identity):
    handle_train(_message(tiny_cfg), _deployed(tiny_cfg, site), None, progress=False)
    (ledger,) = Path(site["state-dir"]).glob("ledger-*.json")
    ledger.write_text(ledger.read_text()[:40])
    with pytest.raises(LedgerError, match="cannot be read .* stops rather than start again from zero"):
        handle_train(_message(tiny_cfg, server_round=2), _deployed(tiny_cfg, site), None, progress=False)
    assert len(ledger.read_text()) == 40  # left as it was for the operator to restore


def test_evaluation_releases_one_loss_per_round_and_nothing_else(tiny_cfg, site, flower_identity):
    ctx = _deployed(tiny_cfg, site)
    reply = handle_evaluate(_message(tiny_cfg, "evaluate"), ctx, None)
    assert set(reply.content.metric_records["metrics"]) == set(EVAL_KEYS)
    with pytest.raises(LedgerError, match="already evaluated"):
        handle_evaluate(_message(tiny_cfg, "evaluate"), _deployed(tiny_cfg, site), None)
    handle_evaluate(_message(tiny_cfg, "evaluate", server_round=2), _deployed(tiny_cfg, site), None)


def test_error_replies_carry_no_data_values(tiny_cfg, site, flower_identity, tmp_path, capsys):
    """A label outside the label set used to travel in the error reply (and summary.json)."""
    rows = [{"text": f"message {i}", "label": "CONFIDENTIAL-DIAGNOSIS" if i == 3 else "ok"} for i in range(40)]
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = tmp_path / "labels.txt"
    labels.write_text(json.dumps(["ok", "not ok"]))
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"data:\n  shape: classification\n  labels_path: {labels}\n")
    node = site | {"data-path": str(data), "policy-file": str(policy)}
    reply = _call(_message(tiny_cfg), _deployed(tiny_cfg, node))
    assert reply.has_error()
    assert "CONFIDENTIAL" not in reply.error.reason
    assert "DataError" in reply.error.reason and "1 label value(s) not in the site's label set" in reply.error.reason
    assert "CONFIDENTIAL-DIAGNOSIS" in capsys.readouterr().err  # the site's own log keeps the detail


def _call(msg, ctx):
    """The ClientApp's train handler as Flower calls it: site errors become error replies."""
    return _errors_as_replies(lambda m, c: handle_train(m, c, None, progress=False))(msg, ctx)


def test_a_deployed_sites_cached_data_stays_in_its_state_dir_owner_only_and_can_be_forgotten(
        tiny_cfg, site, flower_identity, capsys):
    import os
    import stat

    from fedslm.cli import main as cli

    handle_train(_message(tiny_cfg), _deployed(tiny_cfg, site), None, progress=False)
    state = Path(site["state-dir"])
    cache = state / "datasets"
    arrow = [p for p in cache.rglob("*.arrow")]
    assert arrow  # the Arrow copy of the site's rows (and its maps) live here
    for d in (state, cache):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    ledgers = list(state.glob("ledger-*.json"))
    assert cli(["forget", str(state)]) == 0
    assert "the privacy ledgers are kept" in capsys.readouterr().out
    assert not cache.exists() and list(state.glob("ledger-*.json")) == ledgers


def test_a_sites_hardware_is_its_own(tiny_cfg, site):
    """A coordinator asking for CUDA does not make a CPU-only site fail: its node config's
    device (and precision) win, as its paths do."""
    from fedslm.config import from_run_config, to_run_config
    from fedslm.site.policy import SitePolicy

    run = from_run_config(to_run_config(tiny_cfg) | {"train.device": "cuda", "train.precision": "bf16"})
    own = SitePolicy.from_node_config({**site, "device": "cpu", "precision": "fp32"}).site_config(run)
    assert (own.train.device, own.train.precision) == ("cpu", "fp32")
    assert SitePolicy.from_node_config(site).site_config(run).train.device == "cuda"  # unset: the run's
