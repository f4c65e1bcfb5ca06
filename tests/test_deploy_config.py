"""Deployment set-up without processes: one set of defaults, and certificates and keys that
Flower's own loaders accept."""

from __future__ import annotations

import ipaddress
import shutil
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedslm.config import pyproject as app_config
from fedslm.deploy.certs import make_certs
from fedslm.cli import main as cli
from fedslm.config import RunConfig, from_run_config, validate


def test_pyproject_run_config_is_the_hydra_default_run():
    """Fails when conf/ and pyproject's [tool.flwr.app.config] disagree: regenerate with
    `fedslm app-config --write`."""
    assert app_config.differences() == []


def test_the_table_parses_back_to_the_simulation_config():
    table = app_config.pyproject_table()
    deployed = validate(from_run_config(table))
    # the DP recipe, and every other value, exactly the one set of defaults
    assert deployed.train.lr == 0.1 and deployed.lora.target_modules == ["q_proj", "v_proj"]
    assert deployed == RunConfig(output_dir=app_config.DEPLOY_OVERRIDES["output_dir"])
    assert set(table) == set(app_config.hydra_defaults())  # every key is overridable by flwr run


def test_a_drifted_table_is_reported_and_rewritten(tmp_path, monkeypatch):
    copy = tmp_path / "pyproject.toml"
    text = app_config.PYPROJECT.read_text()
    copy.write_text(text.replace('"train.lr" = 0.1', '"train.lr" = 0.005'))
    assert any(line.startswith("train.lr: pyproject has 0.005") for line in app_config.differences(copy))
    app_config.write_table(copy)
    assert app_config.differences(copy) == []
    # only the table changed: every other section is as it was
    before, after = tomllib.loads(text), tomllib.loads(copy.read_text())
    assert after["project"] == before["project"] and after["tool"]["pytest"] == before["tool"]["pytest"]
    assert after["tool"]["flwr"]["app"]["components"] == before["tool"]["flwr"]["app"]["components"]


def test_no_federations_table_for_flwr_to_migrate():
    """`flwr run`/`flwr supernode register` rewrite a pyproject that still has one."""
    assert "federations" not in tomllib.loads(app_config.PYPROJECT.read_text())["tool"]["flwr"]


def test_certs_are_what_flower_loads(tmp_path, capsys):
    from flwr.cli.supernode.register import try_load_public_key
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    assert cli(["certs", str(tmp_path), "--host", "127.0.0.1", "--host", "coordinator.example", "--sites", "3"]) == 0
    out = capsys.readouterr().out
    assert "hospital's own PKI" in out and "site 2: private key" in out

    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    for site in range(3):
        private = load_ssh_private_key((tmp_path / f"site-{site}").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert (tmp_path / f"site-{site}").stat().st_mode & 0o077 == 0  # private keys: owner only
        # flwr supernode register's own loader accepts the public half
        assert len(try_load_public_key(tmp_path / f"site-{site}.pub")) > 0
    assert not (tmp_path / "site-3").exists()


def test_private_keys_are_owner_only_from_the_first_byte_and_never_replaced(tmp_path, capsys, monkeypatch):
    """A world-readable umask must not matter: the key file is created 0600 (no write-then-
    chmod window); a second `fedslm certs` into the same directory refuses; --force replaces."""
    import os

    created = {}
    real_open = os.open

    def spy(path, flags, mode=0o777, *a, **k):
        fd = real_open(path, flags, mode, *a, **k)
        created[str(path)] = os.fstat(fd).st_mode & 0o777  # the mode the file was born with
        return fd

    old_umask = os.umask(0o000)
    monkeypatch.setattr(os, "open", spy)
    try:
        assert cli(["certs", str(tmp_path), "--sites", "1"]) == 0
    finally:
        os.umask(old_umask)
        monkeypatch.undo()
    assert created[str(tmp_path / "server.key")] == 0o600 and created[str(tmp_path / "site-0")] == 0o600
    # the app publisher's signing key and the site worker's secret too
    assert created[str(tmp_path / "publisher")] == 0o600 and created[str(tmp_path / "site-0.secret")] == 0o600
    assert created[str(tmp_path / "ca.crt")] == 0o644
    before = (tmp_path / "site-0").read_bytes()
    capsys.readouterr()
    assert cli(["certs", str(tmp_path), "--sites", "1"]) == 2
    assert "already exist" in capsys.readouterr().err and (tmp_path / "site-0").read_bytes() == before
    assert cli(["certs", str(tmp_path), "--sites", "1", "--force"]) == 0
    assert (tmp_path / "site-0").read_bytes() != before and (tmp_path / "site-0").stat().st_mode & 0o077 == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_server_cert_verifies_for_its_host_only(tmp_path):
    import subprocess

    make_certs(tmp_path, ["127.0.0.1"], sites=0)
    ok = subprocess.run(["openssl", "verify", "-CAfile", tmp_path / "ca.crt", "-verify_ip", "127.0.0.1",
                         tmp_path / "server.pem"], capture_output=True, text=True)
    bad = subprocess.run(["openssl", "verify", "-CAfile", tmp_path / "ca.crt", "-verify_ip", "10.0.0.9",
                          tmp_path / "server.pem"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode != 0


@pytest.mark.parametrize("poll_s", [0.05, 0.5])
def test_fedslm_supernode_runs_flowers_supernode_with_its_waits_paced(monkeypatch, poll_s):
    """The idle poll (Flower: 3 s), the look for the app's reply (Flower: 0.5 s; here at
    most 0.1 s, whatever --poll-s) and the content pull of a message (Flower: up to 2 h,
    which left a SuperNode deaf after a coordinator restart) are capped; everything else is
    flower-supernode's own, with its own arguments."""
    import sys
    import time

    import importlib

    import flwr.supernode.start_client_internal as loop

    cli_mod = importlib.import_module("flwr.supernode.cli.flower_supernode")
    if not hasattr(cli_mod, "__file__"):  # the package re-exports the function under the module's name
        cli_mod = sys.modules["flwr.supernode.cli.flower_supernode"]

    from fedslm.site.supernode import run

    seen = {}

    def fake_supernode():
        seen["argv"] = list(sys.argv)
        started = time.monotonic()
        loop.time.sleep(3)  # what the loop does when no message is waiting
        seen["slept"] = time.monotonic() - started
        loop._push_messages()  # a message was taken and its reply sent
        started = time.monotonic()
        loop.time.sleep(0.5)  # what it does while the app works on a message
        seen["reply_look"] = time.monotonic() - started
        seen["reply_looks"] = [loop.time.reply.next() for _ in range(12)]
        seen["after_reply"] = [loop.time.idle.next() for _ in range(12)]
        seen["pull_max_time"] = loop.pull_objects.keywords["max_time"]
        seen["monotonic"] = loop.time.monotonic is time.monotonic

    monkeypatch.setattr(cli_mod, "flower_supernode", fake_supernode)
    monkeypatch.setattr(loop, "time", time)
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    monkeypatch.setattr(loop, "_push_messages", lambda *a, **k: None)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    run(poll_s, ["--superlink", "127.0.0.1:1", "--isolation", "process"], pull_timeout_s=42.0)
    assert seen["argv"] == ["flower-supernode", "--superlink", "127.0.0.1:1", "--isolation", "process"]
    assert seen["slept"] < 1.0 and seen["pull_max_time"] == 42.0 and seen["monotonic"]
    assert seen["reply_look"] < 0.1
    for waits, cap in ((seen["reply_looks"], min(poll_s, 0.1)), (seen["after_reply"], poll_s)):
        assert waits[0] < 0.05 and waits == sorted(waits) and waits[-1] == cap


def test_backoff_is_quick_after_activity_and_stretches_to_the_idle_cap():
    from fedslm.deploy.pacing import Backoff

    pace = Backoff(cap=0.5, first=0.02, growth=1.5)
    assert pace.next() == 0.5  # nothing seen yet: idle
    pace.reset()
    waits = [pace.next() for _ in range(12)]
    assert waits[0] == 0.02 and all(b == min(0.5, a * 1.5) for a, b in zip(waits, waits[1:]))
    assert waits[-1] == 0.5 and sum(w < 0.5 for w in waits) == 8  # a handful of quick looks, then idle
    for bad in ({"cap": 0.0}, {"cap": 0.5, "first": 1.0}, {"cap": 0.5, "growth": 0.5}):
        with pytest.raises(ValueError, match="need 0 < first <= cap"):
            Backoff(**bad)


def test_prompt_grid_fetches_reply_content_without_flowers_one_second_backoff(monkeypatch):
    """Flower's deployment Grid retried a reply's not-yet-uploaded content after 1 s,
    doubling; PromptGrid makes that module's pull retry from 20 ms (and leaves other
    grids' modules alone)."""
    import functools

    import flwr.superlink.grid.http_grid as http_grid
    from flwr.superlink.grid.http_grid import HttpGrid

    from fedslm.server.grid import PromptGrid

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    PromptGrid(HttpGrid.__new__(HttpGrid), poll_s=0.2)
    pull = http_grid.pull_objects
    assert isinstance(pull, functools.partial) and pull.keywords == {"initial_backoff": 0.02, "backoff_cap": 0.2}
    PromptGrid(HttpGrid.__new__(HttpGrid), poll_s=0.2)  # a second wrap does not stack
    assert http_grid.pull_objects is pull


def test_prompt_grid_returns_every_reply_and_keeps_the_timeout():
    import time
    from types import SimpleNamespace

    from fedslm.server.grid import PromptGrid

    class SlowSites:
        """Each site's reply becomes available at its own time after the push."""

        def __init__(self, ready_after):
            self.ready_after, self.pulls = ready_after, 0

        def push_messages(self, messages):
            self.t0 = time.monotonic()
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            self.pulls += 1
            now = time.monotonic() - self.t0
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)
                    if now >= self.ready_after[i]]

    sites = SlowSites({"m0": 0.0, "m1": 0.05, "m2": 0.3})
    t = time.monotonic()
    got = PromptGrid(sites, poll_s=0.2).send_and_receive([object()] * 3)
    took = time.monotonic() - t
    assert sorted(m.metadata.reply_to_message_id for m in got) == ["m0", "m1", "m2"]
    assert took < 0.3 + 0.2 + 0.1 and sites.pulls < 15  # the last reply is seen within one idle poll
    late = SlowSites({"m0": 0.0, "m1": 5.0})
    t = time.monotonic()
    got = PromptGrid(late, poll_s=0.2).send_and_receive([object()] * 2, timeout=0.4)
    assert [m.metadata.reply_to_message_id for m in got] == ["m0"] and time.monotonic() - t < 0.8


def test_supernode_refuses_a_heartbeat_the_superlink_would_refuse(capsys):
    assert cli(["supernode", "--heartbeat-s", "5", "--"]) == 2
    assert "--heartbeat-s 5 is outside the 10-1800 s the SuperLink accepts" in capsys.readouterr().err
