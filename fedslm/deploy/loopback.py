"""A whole deployment on 127.0.0.1: SuperLink with TLS and node authentication, one
SuperNode and one site worker (`fedslm site`, signed apps only) per site, `flwr run` of
the app signed by the publisher key. Used by the deployment tests and the round-time benchmark;
the commands are the README's (Deploy), with local ports and paths.

Every process is started in its own session and ended by its process group id, so the
SuperExec and ClientApp processes Flower spawns go with it; nothing is found by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedslm.config.compose import REPO_ROOT  # the app `flwr run` packages: this project
from fedslm.deploy.certs import CertPaths, make_certs, make_node_keys

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr live beside python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a new server could listen on the port now. SO_REUSEADDR as servers set it:
    connections of killed processes left in TIME_WAIT do not count, a live listener does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    port: int

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the process, its process group, every descendant by pid, and the process
        group of any descendant that leads one: Flower starts the SuperExec in a session of
        its own (start_new_session), and the ServerApp/ClientApp processes it spawns join
        that group, so the group of the process started here alone would leave them running.
        Then wait (bounded) until every one of them is gone."""
        import psutil

        family: dict[int, psutil.Process] = {}
        for _ in range(3):  # a child spawned while we were killing is caught on the next pass
            try:
                found = psutil.Process(self.popen.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                found = []
            new = [p for p in found if p.pid not in family]
            family.update((p.pid, p) for p in new)
            groups = {self.popen.pid}
            for p in new:
                try:
                    if os.getpgid(p.pid) == p.pid:  # a group leader of its own (the SuperExec)
                        groups.add(p.pid)
                except ProcessLookupError:
                    pass
            for group in groups:
                try:
                    os.killpg(group, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            for p in new:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            if not new and self.popen.poll() is not None:
                break
        self.popen.wait(timeout=30)
        deadline = time.time() + 20
        while (alive := [p for p in family.values() if _running(p)]) and time.time() < deadline:
            time.sleep(0.2)
        if alive:
            raise RuntimeError(f"{self.name}: processes {[p.pid for p in alive]} still alive after SIGKILL")


def _running(proc) -> bool:
    """Alive and not a zombie (an orphan whose exit the init process has not reaped yet
    holds no port and no memory)."""
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Loopback:
    root: Path
    sites: int = 2
    certs: CertPaths | None = None
    link_port: int = 0
    procs: list[Proc] = field(default_factory=list)
    link: Proc | None = None
    nodes: dict[int, Proc] = field(default_factory=dict)
    # every site's own data file (synthetic clinic rows) and its model cache: a deployed
    # site never takes either from the coordinator
    site_examples: int = 54
    site_eval_examples: int = 0  # > 0: the site also has a held-out file of this many rows (data-eval-path)
    cache: Path | None = None
    workers: dict[int, Proc] = field(default_factory=dict)
    node_ports: dict[int, int] = field(default_factory=dict)
    signature: str | None = None  # `app-signature` of this repository's app, made at the first run
    poll_s: float = 0.5  # the SuperNodes' idle wait (fedslm supernode --poll-s)

    def __post_init__(self):
        self.root = Path(self.root)
        (self.root / "flwr-home").mkdir(parents=True, exist_ok=True)
        self.certs = make_certs(self.root / "certs", ["127.0.0.1"], self.sites)
        self.link_port = self.link_port or free_port()
        # every site trusts the publisher key and nothing else
        from fedslm.deploy.signing import trusted_entity

        kid, line = trusted_entity(self.certs.publisher_pub)
        self.trusted = self.root / "trusted-publishers.yaml"
        self.trusted.write_text(f'{kid}: "{line}"\n')
        # the coordinator's `flwr` talks to the SuperLink through a named connection
        (self.root / "flwr-home" / "config.toml").write_text(
            '[superlink]\ndefault = "fedslm"\n\n[superlink.fedslm]\n'
            f'address = "127.0.0.1:{self.link_port}"\nroot-certificates = "{self.certs.ca_cert}"\n'
        )

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.root / "flwr-home")
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # SuperLink/SuperNode spawn flower-superexec
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        env["FEDSLM_NO_PROGRESS"] = "1"
        return env

    def _start(self, name: str, cmd: list[str], port: int) -> Proc:
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                     start_new_session=True)
        proc = Proc(name, popen, log, port)
        self.procs.append(proc)
        return proc

    def start_link(self) -> Proc:
        c = self.certs
        self.link = self._start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert),
            "--ssl-keyfile", str(c.server_key), "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--database", str(self.root / "superlink.db"), "--port", str(self.link_port),
        ], self.link_port)
        wait_for(lambda: "Uvicorn running on https://" in self.link.text(), 60, "the SuperLink to listen", self.link)
        return self.link

    def start_federation(self) -> None:
        """The SuperLink, every site's key registered, every site's SuperNode connected."""
        self.start_link()
        for site in range(self.sites):
            self.register(site)
            self.start_node(site)
        for site in range(self.sites):
            wait_for(lambda s=site: "SuperNode ID" in self.nodes[s].text(), 60, f"site {site} to connect", self.nodes[site])

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        # run outside the repository: `flwr` would migrate a pyproject it finds in the cwd
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, env=self.env,
                              cwd=self.root, timeout=timeout)

    def register(self, site: int) -> None:
        res = self.flwr("supernode", "register", str(self.certs.site_keys[site][1]), "fedslm")
        if res.returncode != 0 or "registered successfully" not in res.stdout:
            raise RuntimeError(f"registering site {site} failed: {res.stdout}{res.stderr}")

    def start_node(self, site: int, node_config: str = "", key: Path | None = None, ca: Path | None = None,
                   name: str | None = None, superlink: str | None = None) -> Proc:
        """The site's SuperNode (process isolation: it runs no app code itself) and, for a
        registered site, its worker on the SuperNode's Runtime API port."""
        port = free_port() if name is not None else self.node_ports.setdefault(site, free_port())
        state = self.root / f"site-{site}-state"
        own = f'data-path="{self.site_data(site)}"' + (f' cache-dir="{self.cache}"' if self.cache else "")
        if self.site_eval_examples:
            own += f' data-eval-path="{self.site_data(site, held_out=True)}"'
        cfg = f'site-id={site} state-dir="{state}" {own} {node_config}'.strip()
        proc = self._start(name or f"supernode-{site}", [
            sys.executable, "-m", "fedslm.cli", "supernode", "--poll-s", str(self.poll_s), "--",
            "--superlink", superlink or f"127.0.0.1:{self.link_port}",
            "--root-certificates", str(ca or self.certs.ca_cert),
            "--auth-supernode-private-key", str(key or self.certs.site_keys[site][0]),
            "--port", str(port), "--node-config", cfg, "--isolation", "process",
            *(["--superexec-auth-secret-file", str(self.certs.site_secrets[site])] if site < self.sites else []),
        ], port)
        if name is None:
            self.nodes[site] = proc
            if site not in self.workers or not self.workers[site].alive():
                self.start_worker(site)
        return proc

    def restart_node(self, site: int, within: float = 300) -> int:
        """Start the site's SuperNode again as a supervisor (systemd Restart=on-failure) would:
        after a kill -9 the SuperLink refuses the same key until the dead node misses two
        heartbeats (20 s at `fedslm supernode`'s 10 s interval), and the new SuperNode gives
        up (exit 305) after its retries; start it again until it connects. Returns how many
        starts it took."""
        deadline, starts = time.time() + within, 0
        while time.time() < deadline:
            starts += 1
            log = self.root / f"supernode-{site}.log"
            offset = log.stat().st_size if log.exists() else 0
            proc = self.start_node(site)
            while proc.alive() and time.time() < deadline:
                if "SuperNode ID" in proc.text()[offset:]:
                    return starts
                time.sleep(1)
            time.sleep(5)
        raise TimeoutError(f"site {site}'s SuperNode did not reconnect within {within}s")

    def start_worker(self, site: int, trusted: Path | None = None, secret: Path | None = None) -> Proc:
        port = self.node_ports[site]
        proc = self._start(f"site-{site}-worker", [
            sys.executable, "-m", "fedslm.cli", "site", "--runtime-api", f"127.0.0.1:{port}",
            "--trusted-entities", str(trusted or self.trusted),
            "--auth-secret-file", str(secret or self.certs.site_secrets[site]),
        ], 0)
        self.workers[site] = proc
        return proc

    def signed(self, run_config: str) -> list[str]:
        """`--run-config` arguments of a run: the config, then the publisher's signature of the app."""
        if self.signature is None:
            from fedslm.deploy.signing import fab_bytes, load_private_key, sign_fab

            self.signature = sign_fab(fab_bytes(REPO_ROOT), load_private_key(self.certs.publisher_key))
        return ["--run-config", run_config, "--run-config", f'app-signature="{self.signature}"']

    def site_data(self, site: int, held_out: bool = False) -> Path:
        """The site's own data file (or its held-out file), written once: the built-in
        synthetic clinic rows."""
        import json

        from fedslm.data.clinic import generate_site

        path = self.root / f"site-{site}-{'eval' if held_out else 'data'}.jsonl"
        if not path.exists():
            n = self.site_eval_examples if held_out else self.site_examples
            rows = generate_site(site, n, seed=1 if held_out else 0)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def unregistered_key(self) -> Path:
        return make_node_keys(self.root / "certs", "stranger")[0]

    def run(self, run_config: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`flwr run` the app in this repository and stream its log until it ends."""
        return self.flwr("run", str(REPO_ROOT), "fedslm", "--stream", *self.signed(run_config), timeout=timeout)

    def run_unwatched(self, run_config: str, done: Path, timeout: float = 600) -> str:
        """`flwr run` without `--stream`, as an operator submits a run and looks later: no
        CLI process streams the log from the SuperLink on this machine while the run goes.
        Waits until `done` (a file the ServerApp writes last) exists or the run ends;
        returns the run's final status as `flwr ls` reports it."""
        import json

        res = self.flwr("run", str(REPO_ROOT), "fedslm", "--format", "json", *self.signed(run_config))
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed: {res.stdout[-2000:]}{res.stderr[-2000:]}")
        run_id = json.loads(res.stdout)["run-id"]
        deadline, asked = time.time() + timeout, time.time()
        while time.time() < deadline:
            # the run's own output is looked at often; the SuperLink is asked rarely (each
            # `flwr ls` is a Python start-up on the machine the federation runs on): every
            # 2 s once `done` is there (the ServerApp is ending), else every 20 s
            if time.time() - asked > (2 if done.exists() else 20):
                asked = time.time()
                listed = json.loads(self.flwr("ls", "--run-id", str(run_id), "--format", "json").stdout)
                status = listed["runs"][0]["status"]
                if status.startswith("finished"):
                    return status
            time.sleep(0.2)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f}s")

    def run_async(self, run_config: str) -> Proc:
        return self._start("flwr-run", [str(BIN / "flwr"), "run", str(REPO_ROOT), "fedslm", "--stream",
                                        *self.signed(run_config)], 0)

    def stop(self) -> list[int]:
        """End every process started here; returns the ports still taken (should be none)."""
        for proc in reversed(self.procs):
            proc.kill()
        ports = {p.port for p in self.procs if p.port}
        deadline = time.time() + 30
        while time.time() < deadline and not all(port_is_free(p) for p in ports):
            time.sleep(0.5)
        return sorted(p for p in ports if not port_is_free(p))


def wait_for(check, timeout: float, what: str, proc: Proc | None = None, interval: float = 0.3) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.text()[-3000:]}")
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                       + (f"; {proc.name} log:\n{proc.text()[-3000:]}" if proc else ""))


def run_config_string(values: dict) -> str:
    """`--run-config` text: TOML values, strings quoted."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        return repr(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in values.items())
