"""Flower ServerApp: reads the run's config and hands the rounds to fedslm.server.run."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedslm.config import RunConfig, from_run_config, validate
from fedslm.server.grid import PromptGrid
from fedslm.server.run import run_server


def build_server_app(cfg: RunConfig | None = None) -> ServerApp:
    """With `cfg` (simulation from Hydra) it is used as is; without, the config comes
    from Flower's flat run_config (deployment with `flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else validate(from_run_config(context.run_config))
        run_server(PromptGrid(grid), run_cfg)

    return app


app = build_server_app()
