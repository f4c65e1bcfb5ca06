"""`fedslm supernode`: Flower's own SuperNode, with its idle waits shortened.

Flower 1.41's SuperNode asks the SuperLink for a message and, when there is none, sleeps
3 s (a literal in flwr.supernode.start_client_internal); it also looks for the app's
reply in 0.5 s steps. A fedslm round sends each site two messages (train, then
evaluate), each a moment after the server has the previous replies, so the SuperNode had
just gone to sleep each time: about 2.5 s lost per message, 5-6 s per round, which was
most of a deployed round with a small model. Here both waits are paced
(fedslm.deploy.pacing: 20 ms right after this site took a message or replied,
stretching to --poll-s for the SuperLink, to 0.1 s for the reply: that look is at the
SuperNode's own in-memory state, no request, and with a 0.5 s cap a training reply sat
there for up to half a second, measured as 1.1 s from a site's reply to the server's).

A second wait is the one for a message's content: a SuperLink killed while a SuperNode
pulled a message leaves the SuperNode retrying objects the restarted SuperLink no longer
has, for up to two hours (Flower's PULL_MAX_TIME), deaf to the resumed run. Here the pull
gives up after `--pull-timeout-s` (Flower then drops that message and goes on); a live
SuperLink makes a message pullable only once its content is stored, so a healthy pull
never waits.

The third is liveness. A SuperNode declares its heartbeat interval to the SuperLink, which
counts it online until two intervals pass without one. Flower's SuperNode declares 30 s:
a site killed mid-round was still counted online for up to a minute (the round sampled it
and waited `federation.timeout_s` for it), a site restarted after a kill -9 was refused
(exit 305) for that minute, and after a SuperLink restart a resumed run waited up to 30 s
to see the sites online. Here it declares `--heartbeat-s` (default 10 s, the least the
SuperLink accepts): a heartbeat every 4 s or so, offline after 20 s.

This runs Flower's `flower-supernode` entry point unchanged except for those waits. The
price is load on the SuperLink: each idle site asks it for messages 1/poll_s times a
second (3 sites at 0.5 s: 6 requests/s; 100 sites: 200/s, where a longer poll is the
better choice), plus about ten quick asks after each of its replies. Every argument after `--` is flower-supernode's.
"""

from __future__ import annotations

import sys
import time as _time

REPLY_POLL_S = 0.1  # the longest wait between looks for the app's reply (Flower's: 0.5 s)


class _Pacing:
    """Stands in for the `time` module inside Flower's SuperNode loop: every attribute is
    time's own, except sleep(). Flower sleeps 3 s when the SuperLink had no message: here
    `idle` decides, quick right after this site replied (the next message of the round
    follows within moments), stretching to poll_s. It sleeps 0.5 s between looks at its
    own state for the app's reply: here `reply` decides, quick right after the message
    was taken (an evaluate message is served in milliseconds), stretching to
    REPLY_POLL_S (a look is a dictionary lookup: ten a second cost nothing)."""

    def __init__(self, poll_s: float):
        from fedslm.deploy.pacing import Backoff

        self.idle, self.reply = Backoff(cap=poll_s), Backoff(cap=min(poll_s, REPLY_POLL_S))

    def sleep(self, seconds: float) -> None:
        _time.sleep((self.idle if seconds >= 1 else self.reply).next())

    def __getattr__(self, name):
        return getattr(_time, name)


def run(poll_s: float, supernode_args: list[str], pull_timeout_s: float = 60.0, heartbeat_s: float = 10.0) -> None:
    import functools

    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as fleet
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    # the interval is a module constant in both places that use it: the one the SuperNode
    # declares (activation, each heartbeat) and the one its heartbeat thread paces itself by
    if hasattr(fleet, "HEARTBEAT_DEFAULT_INTERVAL") and hasattr(heartbeat, "HEARTBEAT_DEFAULT_INTERVAL"):
        fleet.HEARTBEAT_DEFAULT_INTERVAL = heartbeat.HEARTBEAT_DEFAULT_INTERVAL = heartbeat_s
    else:
        print("fedslm supernode: flwr's heartbeat constants have moved; using Flower's own interval "
              "(--heartbeat-s not applied)", file=sys.stderr)

    if getattr(loop, "time", None) is not _time or not callable(getattr(loop, "pull_objects", None)):
        # another Flower than the one this was written against: run it as it is
        print("fedslm supernode: flwr's SuperNode loop has changed; running it with its own waits "
              "(--poll-s and --pull-timeout-s not applied)", file=sys.stderr)
    else:
        pacing = _Pacing(poll_s)
        loop.time = pacing
        push = loop._push_messages

        def push_then_listen(*args, **kwargs):
            pacing.reply.reset()  # a message was just taken: its reply is looked for at once
            try:
                return push(*args, **kwargs)
            finally:
                pacing.idle.reset()

        loop._push_messages = push_then_listen
        # and no 1 s first back-off for content the SuperLink is still storing
        loop.pull_objects = functools.partial(loop.pull_objects, max_time=pull_timeout_s, initial_backoff=0.05,
                                              backoff_cap=min(10.0, poll_s * 10))
    sys.argv = ["flower-supernode", *supernode_args]
    flower_supernode()
