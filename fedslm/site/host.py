"""The app host: one process per Flower run, started by the site worker
(fedslm.site.worker), that serves every message of that run in turn.

Flower's `flwr-clientapp` serves one message and exits, so each train and evaluate paid
the imports, the model load and the tokenisation again. A host keeps the run's ClientApp
(and with it fedslm's site runtime: model, tokenised data, Opacus wrapper) alive between
messages. Each message still goes through Flower's own Runtime API calls, exactly as
`flwr-clientapp` makes them.

Before any of the app's code is imported, the host checks that the run's FAB is signed by
a key the site trusts (fedslm.deploy.signing). That is why this file runs as a script
(`python -I host.py`), not as `fedslm.site.host`: the signed app brings its own `fedslm`,
and nothing of the site's installed copy may be imported first and shadow it. Until the
check passes only the standard library, flwr, cryptography, signing.py (loaded by file
path) and the third-party libraries named by `--preload` (a spare host's, imported before
any run: torch, transformers, peft, opacus; never fedslm) are in the process.

Protocol with the worker: one task token per line on stdin; the host answers each with
one line on stdout (`done TOKEN`), so the worker knows when the host is idle.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # stdout is the worker's channel, from the first byte: whatever an import, the app or a
    # C library prints goes to stderr
    CHANNEL = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # the kernel ends this host when its worker dies: a host never outlives the worker (a
    # restarted worker's new host would otherwise run beside it, both writing the ledger)
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: a supervisor that kills the worker's process group does the same

import argparse  # noqa: E402 - after the channel is set up
import importlib.util  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

# The worker hands a task over as soon as the SuperNode has the message's header, often
# before its content: Flower's pull then backs off 1 s, doubling, for content that arrives
# over the loopback within milliseconds. Retry at 20 ms, doubling to at most 0.1 s (a
# local call).
if callable(getattr(run_clientapp, "pull_and_inflate_object_from_tree", None)):
    import functools

    run_clientapp.pull_and_inflate_object_from_tree = functools.partial(
        run_clientapp.pull_and_inflate_object_from_tree, initial_backoff=0.02, backoff_cap=0.1)

SIGNING = Path(__file__).resolve().parent.parent / "deploy" / "signing.py"


def _load_signing():
    spec = importlib.util.spec_from_file_location("_fedslm_site_signing", SIGNING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log(text: str) -> None:
    print(f"[site host {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Host:
    def __init__(self, runtime_api: str, trusted_entities: Path, root_certificates: Path | None):
        self.runtime_api = runtime_api
        self.certificates = root_certificates.read_bytes() if root_certificates else None
        self.signing = _load_signing()
        # read when the run's first message arrives, not now: a spare host may wait hours,
        # and a key the site has withdrawn since must not let a run in
        self.trusted_entities = trusted_entities
        self.fab_hash: str | None = None  # the one app this host runs, once checked
        self.refusal: Exception | None = None  # why it was refused (or failed to load)
        self.app = None
        # the verified FAB is installed here, private to this host, and loaded from here: a
        # shared apps directory could hold another install under the same name
        self.install_root = Path(tempfile.mkdtemp(prefix="fedslm-app-"))

    def _client(self, token: str) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api,
            insecure=self.certificates is None,
            root_certificates=self.certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def _admit(self, run, fab, context) -> None:
        """Verify the run's app once, then install and load it; raise UnsignedAppError
        (every later message of the run is refused for the same reason)."""
        if self.fab_hash is None:
            self.fab_hash = fab.hash_str
            try:
                trusted = self.signing.load_trusted(self.trusted_entities)
                kid = self.signing.check_fab(fab.content, str(context.run_config.get(self.signing.SIGNATURE_KEY, "")),
                                             trusted)
                log(f"run {run.run_id}: app {run.fab_id} {run.fab_version} (FAB sha256 {fab.hash_str[:16]}) is "
                    f"signed by trusted key {kid}")
                # installed from the bytes just verified, and loaded from that install, which
                # also refuses a fab_id or fab_version other than the signed pyproject's
                path = install_from_fab(fab.content, install_dir=self.install_root, skip_prompt=True)
                self.app = get_load_client_app_fn(default_app_ref="", app_path=str(path), multi_app=True)(
                    run.fab_id, run.fab_version, fab.hash_str)
            except self.signing.UnsignedAppError as err:
                self.refusal = err
                log(f"REFUSED run {run.run_id}: {err}. No code of this app was run.")
            except Exception as err:  # noqa: BLE001 - every later message of the run fails the same way
                self.refusal = err
                raise
        elif fab.hash_str != self.fab_hash:
            raise LoadClientAppError(f"this host serves FAB {self.fab_hash[:16]}, not {fab.hash_str[:16]}")
        if self.refusal is not None:
            raise self.refusal

    def serve_task(self, token: str) -> None:
        client = self._client(token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        times = [time.perf_counter()]
        try:
            message, context, run, fab = pull_task_input(client)
            times.append(time.perf_counter())
            self._admit(run, fab, context)
            reply = self.app(message=message, context=context)
            times.append(time.perf_counter())
            status, details = SubStatus.COMPLETED, ""
        except self.signing.UnsignedAppError as err:
            details = f"the site refused the app: {err}"
            if message is not None:
                reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=details), reply_to=message)
        except Exception as err:  # noqa: BLE001 - reported to the server as Flower reports it
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(err, LoadClientAppError) \
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(err)}:<'{err}'>"
            log(f"the ClientApp raised {type(err).__name__}: {err}")
            import traceback

            traceback.print_exc()
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client=client, context=context, sub_status=status, details=details)
                if len(times) == 3:
                    log(f"run {context.run_id}: {message.metadata.message_type} message: pulled in "
                        f"{times[1] - times[0]:.2f}s, served in {times[2] - times[1]:.2f}s, replied in "
                        f"{time.perf_counter() - times[2]:.2f}s")
            finally:
                heartbeat.stop()
                client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fedslm-site-host")
    ap.add_argument("--runtime-api", required=True)
    ap.add_argument("--trusted-entities", type=Path, required=True)
    ap.add_argument("--root-certificates", type=Path, default=None)
    ap.add_argument("--preload", default="", help="comma-separated third-party modules to import before any run")
    args = ap.parse_args(argv)
    for name in filter(None, args.preload.split(",")):
        if name.split(".")[0] == "fedslm":
            ap.error("--preload: fedslm comes with the run's signed app and must not be imported before its check")
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - a head start only: the app imports what it needs itself
            log(f"could not preload {name} ({type(err).__name__}: {err}); the run's app will import it if it needs it")
    host = Host(args.runtime_api, args.trusted_entities, args.root_certificates)
    try:
        CHANNEL.write("ready\n")
        for line in sys.stdin:
            token = line.strip()
            if token:
                host.serve_task(token)
                CHANNEL.write(f"done {token}\n")
    finally:
        shutil.rmtree(host.install_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
