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
        self.spawned = 0

    def __call__(self):
        self.spawned += 1
        return subprocess.Popen([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)


def test_the_spare_is_started_at_once_taken_by_the_next_run_and_renewed_only_when_idle(trusted, monkeypatch):
    worker = SiteWorker("127.0.0.1:9", trusted)
    spawn = _FakeHost()
    monkeypatch.setattr(worker, "_spawn", spawn)
    try:
        worker._keep_spare(float("inf"))  # start-up: nothing has run yet
        first = worker.spare
        assert spawn.spawned == 1 and first is not None
        worker._keep_spare(float("inf"))
        assert spawn.spawned == 1  # one spare at a time

        host = worker._host(run_id=7)  # the run takes the spare instead of starting cold
        assert host.proc is first and worker.spare is None and spawn.spawned == 1
        host.hand("task-1")  # the run's host is now working
        worker._keep_spare(600.0)
        assert worker.spare is None  # its imports would take CPU from the run

        host.pending.clear()  # the task is done
        worker._keep_spare(30.0)
        assert worker.spare is None  # between two messages of a round: not idle yet
        worker._keep_spare(61.0)
        assert spawn.spawned == 2 and worker.spare is not None

        worker.spare.kill()  # a spare that died is replaced, and never handed a run
        worker.spare.wait()
        host2 = worker._host(run_id=8)
        assert host2.proc is not first and host2.proc.poll() is None and spawn.spawned == 3
    finally:
        for h in worker.hosts.values():
            h.stop()
        if worker.spare is not None:
            worker.spare.kill()
        first.kill()


def test_no_spare_when_the_site_turns_it_off(trusted, monkeypatch):
    worker = SiteWorker("127.0.0.1:9", trusted, spare_after_idle_s=None)
    spawn = _FakeHost()
    monkeypatch.setattr(worker, "_spawn", spawn)
    worker._keep_spare(float("inf"))
    assert spawn.spawned == 0 and worker.spare is None


def test_site_refuses_a_negative_idle_time(trusted, capsys):
    from fedslm.cli import main as cli

    assert cli(["site", "--trusted-entities", str(trusted), "--spare-after-idle-s", "-1"]) == 2
    assert "--spare-after-idle-s -1.0: give seconds >= 0" in capsys.readouterr().err
