"""The fed-dfkd ServerApp: ``app``, run by ``flwr run .``, the simulation engines and deployment.

It reads the run config keys ``config`` (experiment YAML), ``overrides`` (``;``-separated
``section.key=value``), ``out`` (run folder), ``teachers`` (a pretrain folder the server may read
for reference accuracies; empty in a deployment), ``resume`` (bool) and ``engine`` (a name for
the report), then runs :func:`server.loop.run_server` on the grid it is given.

Flower's ``run_simulation`` hands the ServerApp an empty run config, so engines build their own
app with :func:`make_server_app` and the run config bound; bound keys win over the context's.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.loop import ServerSettings, run_server


def _ensure_logging() -> None:
    """Under ``flwr run`` nothing configures the root logger: show this app's INFO lines."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        # Flower's HTTP client logs every request (each chunk, each log push) at INFO.
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def make_server_app(bound_run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp running the federation; ``bound_run_config`` overrides the context's."""
    server_app = ServerApp()
    bound = dict(bound_run_config or {})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _ensure_logging()
        settings = ServerSettings.from_run_config({**dict(context.run_config), **bound})
        run_server(grid, settings, run_id=context.run_id)

    return server_app


app = make_server_app()
