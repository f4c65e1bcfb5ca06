"""The site worker's spare app host: started before any run so that a run's first
messages do not pay the library imports, never while a run's host is working, and never
with fedslm inside before the run's app is checked. (The whole worker on loopback:
tests/test_deployment.py.)"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from fedslm.site.worker import HOST_SCRIPT, PRELOAD, SiteWorker


@pytest.fixture
def trusted(publisher):
    return publisher[1]


def _host(trusted, *extra) -> list[str]:
    # -v: the interpreter names every module as it imports it
    return [sys.executable, "-I", "-v", str(HOST_SCRIPT), "--runtime-api", "127.0.0.1:9", "--trusted-entities",
            str(trusted), *extra]


def test_a_spare_host_imports_the_libraries_but_no_fedslm_before_a_run(trusted):
    proc = subprocess.run(_host(trusted, "--preload", ",".join(PRELOAD)), input="", capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "ready\n"
    imported = set(re.findall(r"^import '([\w.]+)'", proc.stderr, re.M))
    assert {"torch", "transformers", "peft", "opacus", "opacus.accountants"} <= imported
    # the site's installed fedslm would shadow the signed app's own
    assert not {m for m in imported if m.split(".")[0] == "fedslm"}


def test_a_host_refuses_to_preload_fedslm(trusted):
    proc = subprocess.run(_host(trusted, "--preload", "torch,fedslm.site.runtime"), input="", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "fedslm comes with the run's signed app" in proc.stderr
    assert "ready" not in proc.stdout


class _FakeHost:
    """A process that says ready and then reads tasks until its stdin closes."""

    def __init__(self):
        self.spawned = []

    def __call__(self, preload=False):
        self.spawned.append(preload)
        return subprocess.Popen([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)


def test_the_spare_is_started_at_once_taken_by_the_next_run_and_renewed_only_when_idle(trusted, monkeypatch):
    worker = SiteWorker("127.0.0.1:9", trusted)
    spawn = _FakeHost()
    monkeypatch.setattr(worker, "_spawn", spawn)
    first = None
    try:
        worker._keep_spare(1000.0)  # start-up: nothing has run yet
        first = worker.spare
        assert spawn.spawned == [True] and first is not None  # a spare preloads the libraries
        worker._keep_spare(1000.0)
        assert len(spawn.spawned) == 1  # one spare at a time

        host = worker._host(run_id=7)  # the run takes the spare instead of starting cold
        assert host.proc is first and worker.spare is None and len(spawn.spawned) == 1
        host.hand("task-1")  # the run's host works on a long training message
        worker._keep_spare(2000.0)
        assert worker.spare is None  # its imports would take CPU from the run
        host.pending.clear()  # the task is done at 2000 s
        worker._keep_spare(2030.0)
        assert worker.spare is None  # between two messages of a round: not idle yet
        worker._keep_spare(2061.0)
        assert spawn.spawned == [True, True] and worker.spare is not None

        worker.spare.kill()  # a spare that died is not handed a run: a fresh host is
        worker.spare.wait()
        host2 = worker._host(run_id=8)
        assert host2.proc is not first and host2.proc.poll() is None and spawn.spawned == [True, True, False]
    finally:
        for h in worker.hosts.values():
            h.stop()
        for proc in (worker.spare, first):
            if proc is not None:
                proc.kill()


def test_a_spare_that_dies_is_replaced_after_another_idle_spell_not_in_a_loop(trusted, monkeypatch):
    worker = SiteWorker("127.0.0.1:9", trusted)
    monkeypatch.setattr(worker, "_spawn", lambda preload=False: subprocess.Popen(
        [sys.executable, "-c", "raise SystemExit(3)"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    worker._keep_spare(1000.0)
    worker.spare.wait()
    worker._keep_spare(1001.0)  # seen dead: dropped, and the idle clock starts again
    assert worker.spare is None
    worker._keep_spare(1030.0)
    assert worker.spare is None
    worker._keep_spare(1062.0)
    assert worker.spare is not None
    worker.spare.wait()


def test_no_spare_when_the_site_turns_it_off(trusted, monkeypatch):
    worker = SiteWorker("127.0.0.1:9", trusted, spare_after_idle_s=None)
    spawn = _FakeHost()
    monkeypatch.setattr(worker, "_spawn", spawn)
    worker._keep_spare(1000.0)
    assert spawn.spawned == [] and worker.spare is None


def test_a_spare_host_checks_the_run_against_the_keys_trusted_when_the_run_arrives(tmp_path, publisher):
    """A spare host may wait hours: a publisher key the site withdrew meanwhile must not
    let the next run in."""
    import importlib.util
    from types import SimpleNamespace

    from fedslm.config.compose import REPO_ROOT
    from fedslm.deploy.certs import make_publisher_key
    from fedslm.deploy.signing import SIGNATURE_KEY, fab_bytes, load_private_key, sign_fab, trusted_entity

    spec = importlib.util.spec_from_file_location("_fedslm_site_host_under_test", HOST_SCRIPT)
    host_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_mod)
    private, trusted, _ = publisher
    host = host_mod.Host("127.0.0.1:9", trusted, None)
    try:
        # the site replaces the publisher's key after the spare started
        _, new_public = make_publisher_key(tmp_path / "rotated")
        kid, line = trusted_entity(new_public)
        trusted.write_text(f'{kid}: "{line}"\n')
        fab = fab_bytes(REPO_ROOT)
        signature = sign_fab(fab, load_private_key(private))  # signed with the withdrawn key
        run = SimpleNamespace(run_id=1, fab_id="fedslm/fedslm", fab_version="0.1.0")
        # the host's own copy of signing.py, loaded by path: its error class, not fedslm's
        with pytest.raises(host.signing.UnsignedAppError, match="a key this site does not trust"):
            host._admit(run, SimpleNamespace(content=fab, hash_str="0" * 64),
                        SimpleNamespace(run_config={SIGNATURE_KEY: signature}))
        assert host.app is None
    finally:
        import shutil

        shutil.rmtree(host.install_root, ignore_errors=True)


def test_site_refuses_a_negative_idle_time(trusted, capsys):
    from fedslm.cli import main as cli

    for bad in ("-1", "nan", "inf"):
        assert cli(["site", "--trusted-entities", str(trusted), "--spare-after-idle-s", bad]) == 2
        assert f"--spare-after-idle-s {float(bad)}: give seconds >= 0" in capsys.readouterr().err
