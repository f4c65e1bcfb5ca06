"""The ServerApp's Grid, polled for replies every fraction of a second.

Flower 1.41's deployment Grid (`HttpGrid.send_and_receive`) looks for replies every 3 s,
so each train and each evaluate phase of a round waited 1.5 s on average after the last
site had answered; with a small model that was most of a deployed round. The
simulation's in-memory Grid polls every 0.1 s. This wrapper does the same push-then-pull
loop through the Grid's own `push_messages`/`pull_messages`, looking 20 ms after the push
and stretching to `poll_s` (fedslm.deploy.pacing): a small model's evaluate replies come
within a fraction of a second.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedslm.deploy.pacing import Backoff


def _prompt_object_pulls(grid: Grid, poll_s: float) -> None:
    """The deployment Grid fetches a reply's content with Flower's pull_objects, which
    waits 1 s, doubling, for content the site is still uploading: a reply seen a moment
    before its upload ended arrived a second late. The module's own function, with
    retries from 20 ms up to poll_s (this process only: it is the ServerApp's)."""
    import functools
    import sys

    module = sys.modules.get(type(grid).__module__)
    pull = getattr(module, "pull_objects", None)
    if callable(pull) and not isinstance(pull, functools.partial):
        module.pull_objects = functools.partial(pull, initial_backoff=0.02, backoff_cap=poll_s)


class PromptGrid(Grid):
    def __init__(self, inner: Grid, poll_s: float = 0.2):
        self.inner = inner
        self.poll_s = poll_s
        _prompt_object_pulls(inner, poll_s)

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        pace = Backoff(cap=self.poll_s)
        pace.reset()
        replies: list[Message] = []
        while waiting:
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            wait = pace.next()
            time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
        return replies
