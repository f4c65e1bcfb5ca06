"""A federation with its sites as function calls in this process: a Flower Grid whose
`send_and_receive` hands each message (a deep copy, as the wire would) to the real
ClientApp (client/app.py) with that node's own Context, and returns its reply; an
exception that escapes the app becomes an error reply, as Flower's runtime makes it.

The server side runs unchanged (fedslm.server.run). The tests run the real round loop
through it without starting Ray, and benchmarks/gpu_check.py runs its GPU federation
through it on a machine without Ray (the sites then take turns on the one GPU).
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Iterable
from contextlib import contextmanager

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.app import build_client_app
from fedslm.config import RunConfig, to_run_config
from fedslm.server.run import run_server

FIRST_NODE_ID = 7_000_001  # node ids are not site ids: the server must map them


class InProcessGrid(Grid):
    def __init__(self, cfg: RunConfig, sites: int | None = None, node_config: dict[int, dict] | None = None,
                 run_id: int = 1):
        self.cfg = cfg
        self.app = build_client_app(cfg)
        n = sites if sites is not None else cfg.federation.sites
        self.contexts: dict[int, Context] = {}
        for site in range(n):
            node = FIRST_NODE_ID + 17 * site
            extra = (node_config or {}).get(site, {})
            self.contexts[node] = Context(run_id=run_id, node_id=node, state=RecordDict(),
                                          node_config={"partition-id": site, "num-partitions": n, **extra},
                                          run_config=to_run_config(cfg))
        self.offline: set[int] = set()  # nodes that do not answer (a site lost mid-run)
        self.delivered: list[tuple[str, int]] = []  # (message type, node) in the order sent
        self._run = None

    # --- Grid ---------------------------------------------------------------------------
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid answers through send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid answers through send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.offline:
                continue
            self.delivered.append((msg.metadata.message_type, node))
            received = copy.deepcopy(msg)
            try:
                with _identity(self.contexts[node].run_id, node):
                    reply = self.app(received, self.contexts[node])
            except Exception as err:  # noqa: BLE001 - Flower's runtime turns any failure into an error reply
                reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}\n{traceback.format_exc()}"),
                                reply_to=received)
            replies.append(reply)
        return replies


SERVER_NODE_ID = 1  # Flower's SuperLink node id: the server's messages come from it


@contextmanager
def _identity(run_id: int, node_id: int):
    """Flower stamps every Message with the task identity of the process that creates it;
    here the server and each site take turns in one process."""
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def run_in_process(cfg: RunConfig, echo=lambda *_: None, grid: InProcessGrid | None = None) -> dict:
    """A whole federation (round 0, rounds, outputs) with the sites in this process."""
    grid = grid or InProcessGrid(cfg)
    with _identity(1, SERVER_NODE_ID):
        return run_server(grid, cfg, echo=echo)
