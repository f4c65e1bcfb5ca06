"""The site worker (`fedslm site`): the long-running process a site starts beside its
SuperNode (`flower-supernode --isolation process`), in place of Flower's SuperExec.

It takes the SuperNode's tasks as Flower's SuperExec does (`AcquireTask` on the local
Runtime API, HMAC-authenticated with the site's own secret when the SuperNode is given
one), and hands each to an app host (fedslm.site.host): one process per run that first
checks the run's app against the site's trusted publisher keys and then serves every
message of the run warm. A host that dies (killed, out of memory) is replaced on the
run's next message; the message it held expires in Flower and the server goes on
without that site for the round.

One host is started ahead of need (the spare): at start-up, and again once no host has
had work for a while. It imports the site's installed libraries (`PRELOAD`) while no run
is waiting, so a run's first messages do not pay those imports; whichever run comes
next takes it.

This process never imports the app: it runs only the site's installed code.
"""

from __future__ import annotations

import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST_SCRIPT = Path(__file__).resolve().parent / "host.py"
# Third-party libraries every fedslm app uses, imported by a spare host before any run
# (never fedslm itself: the run's signed app brings its own). Opacus is the one a DP
# site's first training message would otherwise import, with scipy under it.
PRELOAD = ("torch", "transformers", "peft", "opacus", "opacus.accountants")


def log(text: str) -> None:
    print(f"[site worker {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class _Host:
    """One app host process and the tasks handed to it that it has not finished."""

    def __init__(self, run_id: int, proc: subprocess.Popen):
        self.run_id, self.proc = run_id, proc
        self.pending: set[str] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("done "):
                with self._lock:
                    self.pending.discard(line.split(" ", 1)[1].strip())

    def hand(self, token: str) -> bool:
        """Queue one task on the host (it serves them in turn); False if it is gone."""
        with self._lock:
            self.pending.add(token)
        try:
            self.proc.stdin.write(token + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@dataclass
class SiteWorker:
    runtime_api: str  # the SuperNode's Runtime API, host:port (its --port)
    trusted_entities: Path
    root_certificates: Path | None = None  # when the Runtime API serves TLS
    auth_secret_file: Path | None = None  # the SuperNode's --superexec-auth-secret-file
    poll_s: float = 0.25  # a local call, but every site pays it all the time
    spare_after_idle_s: float | None = 60.0  # None: no spare, each run starts its host cold
    hosts: dict[int, _Host] = field(default_factory=dict)
    spare: subprocess.Popen | None = None
    last_work: float = -float("inf")  # monotonic time a task was last taken or last worked on

    def __post_init__(self):
        from fedslm.deploy.signing import load_trusted

        # a bad key file is an error now, at start-up, not at the first message
        self.trusted_ids = sorted(load_trusted(self.trusted_entities))

    def _client(self):
        from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if self.auth_secret_file is not None:
            secret = load_superexec_auth_secret(str(self.auth_secret_file))
            interceptors.append(SuperExecAuthHttpInterceptor(
                master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})))
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api,
            insecure=self.root_certificates is None,
            root_certificates=self.root_certificates.read_bytes() if self.root_certificates else None,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def _host(self, run_id: int) -> _Host:
        host = self.hosts.get(run_id)
        if host is not None and host.proc.poll() is None:
            return host
        if host is not None:
            log(f"run {run_id}: the app host died (exit code {host.proc.returncode}) with {len(host.pending)} "
                "task(s) unfinished (they expire in Flower); starting a new one")
        # one run at a time holds the model in memory: an older run's host is ended, also
        # one still waiting on a message of its run that will never come (a coordinator
        # restarted mid-round leaves such a task behind)
        for other in list(self.hosts.values()):
            other.stop()
        self.hosts.clear()
        proc, self.spare = self.spare, None
        if proc is None or not self._ready(proc):  # no spare, or it died before it was ready
            proc = self._spawn()
            if not self._ready(proc):
                raise RuntimeError(f"the app host for run {run_id} failed to start (exit code {proc.returncode}); "
                                   "its error is above")
        log(f"run {run_id}: app host started (pid {proc.pid})")
        self.hosts[run_id] = _Host(run_id, proc)
        return self.hosts[run_id]

    def _spawn(self, preload: bool = False) -> subprocess.Popen:
        """A new host process; it says `ready` on stdout once it can take a task."""
        cmd = [sys.executable, "-I", str(HOST_SCRIPT), "--runtime-api", self.runtime_api,
               "--trusted-entities", str(self.trusted_entities)]
        if self.root_certificates is not None:
            cmd += ["--root-certificates", str(self.root_certificates)]
        if preload:  # a spare: the imports are done while nothing waits for it
            cmd += ["--preload", ",".join(PRELOAD)]
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    @staticmethod
    def _ready(proc: subprocess.Popen) -> bool:
        """Wait for the host's `ready` line (a spare may still be importing); a host that
        dies or stays silent for two minutes is ended."""
        if select.select([proc.stdout], [], [], 120)[0] and proc.stdout.readline().strip() == "ready":
            return True
        proc.kill()
        proc.wait()
        return False

    def _keep_spare(self, now: float) -> None:
        """Start a spare host when there is none and no host has had work for
        spare_after_idle_s, so that its imports take no CPU from a run (at start-up: at
        once). `now` is time.monotonic()."""
        if any(h.pending for h in self.hosts.values()):
            self.last_work = now
        if self.spare_after_idle_s is None or now - self.last_work < self.spare_after_idle_s:
            return
        if self.spare is not None and self.spare.poll() is not None:
            log(f"the spare app host died (exit code {self.spare.returncode}); its error is above")
            self.spare.wait()
            self.spare = None
            self.last_work = now  # try again after another idle spell, not in a loop
            return
        if self.spare is None:
            self.spare = self._spawn(preload=True)

    def serve(self) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        from fedslm.deploy.pacing import Backoff

        client = self._client()
        log(f"serving the SuperNode at {self.runtime_api}; apps must be signed by one of: "
            f"{', '.join(self.trusted_ids)}")
        # a round's next message follows this site's reply within moments: look again soon
        pace = Backoff(cap=self.poll_s)
        try:
            while True:
                self._keep_spare(time.monotonic())
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                if not (res.HasField("task") and res.token):
                    pace.wait()
                    continue
                pace.reset()
                self.last_work = time.monotonic()
                run_id = res.task.run_id
                try:
                    # the worker never waits on a host: a host stuck on one task must not
                    # keep the site from the next run
                    host = self._host(run_id)
                    if not host.hand(res.token):
                        host.stop()  # it died just now: a new one takes the task
                        self._host(run_id).hand(res.token)
                except Exception as err:  # noqa: BLE001 - one task's failure must not end the site's worker
                    log(f"run {run_id}: task {res.task.task_id} could not be handed to an app host: {err}")
        finally:
            for host in self.hosts.values():
                host.stop()
            if self.spare is not None:
                self.spare.kill()
                self.spare.wait()
            client.close()
