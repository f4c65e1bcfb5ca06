"""Flower ClientApp: a site trains and evaluates on its own data; see fedslm.site.handlers."""

from __future__ import annotations

import sys
from collections.abc import Callable

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedslm.lora.adapter import AdapterMismatchError
from fedslm.config import ConfigError, RunConfig
from fedslm.data.errors import DataError
from fedslm.privacy.accounting import BudgetExceededError
from fedslm.site.handlers import handle_evaluate, handle_train
from fedslm.site.ledger import LedgerError
from fedslm.site.runtime import site_label

# Problems a site can explain in one sentence: they go back to the server as an error
# reply (the server logs which site failed and why) instead of a traceback. Anything else
# is a bug and keeps Flower's full traceback.
SITE_ERRORS = (DataError, BudgetExceededError, AdapterMismatchError, ConfigError, LedgerError)
SITE_ERROR_CODE = 1000


def _errors_as_replies(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except SITE_ERRORS as err:
            reason = f"{type(err).__name__}: {err}"
            print(f"{site_label(context)} refused {msg.metadata.message_type}: {reason}", file=sys.stderr, flush=True)
            if isinstance(err, DataError):  # a data error may quote the rows: its public form only
                reason = f"{type(err).__name__}: {err.public}"
            # one line: the server's log and summary.json keep a reply's reason as one line
            reason = " ".join(reason.split())
            return Message(Error(code=SITE_ERROR_CODE, reason=reason), reply_to=msg)

    return run


def build_client_app(cfg: RunConfig | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    @_errors_as_replies
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, cfg)

    @app.evaluate()
    @_errors_as_replies
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, cfg)

    return app


app = build_client_app()
