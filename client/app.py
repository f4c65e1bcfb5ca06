"""Flower ClientApp: a site trains and evaluates on its own data; see fedslm.site."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedslm.config import RunConfig
from fedslm.site import config_for, handle_evaluate, handle_train


def build_client_app(cfg: RunConfig | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, config_for(context, cfg))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, config_for(context, cfg))

    return app


app = build_client_app()
