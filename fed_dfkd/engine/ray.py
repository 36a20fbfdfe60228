"""The Ray engine: Flower's simulation runtime (``flwr.simulation.run_simulation``), one CPU per client.

Two Flower facts shape it (platform.md §3.2, §4.1, gotcha 6):

- ``run_simulation`` hands every app an **empty** run config, so the ServerApp is built with the
  run config bound (:func:`server.app.make_server_app`) and the ClientApp is wrapped so each node's
  context gets it before the project's ClientApp runs (:func:`bind_run_config`); node configs
  carry ``partition-id`` and ``num-partitions``, set by Flower;
- ``client_resources`` default to 2 CPUs per ClientApp, which serialises clients on 2 cores: this
  engine asks for ``num_cpus=1, num_gpus=0`` per client and gives Ray every usable core.

The Flower and Ray variables of platform.md §2 are set for the run (``FLWR_HOME`` under the
run folder, telemetry and update checks off, Ray usage stats off, no runtime dependency
installation) and restored afterwards. Ray starts in about 15-25 s; it is torn down after the run.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fed_dfkd.transport import keys


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """The variables of platform.md §2 for a run whose Flower state lives in ``flwr_home``."""
    return {
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` (Ray's workers inherit them), restore them afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def bind_run_config(client_app: ClientApp, run_config: Mapping[str, Any]) -> ClientApp:
    """A ClientApp that calls ``client_app`` with ``run_config`` in its context's run config.

    Keys already in the context win (a real ``flwr run`` passes them). Flower refuses a context
    whose run config changed, so ``client_app`` gets a copy of the context that shares its
    ``state``; the state it leaves is handed back, so it persists across rounds as usual.
    """
    bound = dict(run_config)
    wrapper = ClientApp()

    def forward(message: Message, context: Context) -> Message:
        inner = Context(run_id=context.run_id, node_id=context.node_id,
                        node_config=context.node_config, state=context.state,
                        run_config={**bound, **dict(context.run_config)})
        try:
            return client_app(message, inner)
        finally:
            context.state = inner.state

    for message_type in sorted(set(keys.MESSAGE_TYPE_BY_MODE.values())):
        category, action = message_type.split(".", 1)
        getattr(wrapper, category)(action)(forward)
    return wrapper


def run_ray(
    run_config: Mapping[str, Any],
    *,
    num_nodes: int,
    flwr_home: Path,
    num_cpus: int | None = None,
    client_app: ClientApp | None = None,
) -> None:
    """Run the project's ServerApp and ``num_nodes`` ClientApps on Flower's Ray simulation."""
    from flwr.simulation import run_simulation

    from server.app import make_server_app

    if client_app is None:
        from client.app import app as client_app
    flwr_home.mkdir(parents=True, exist_ok=True)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus or usable_cores(), "logging_level": "ERROR",
                      "log_to_driver": False, "include_dashboard": False},
    }
    with environment(flower_environment(flwr_home)):
        run_simulation(
            server_app=make_server_app(run_config),
            client_app=bind_run_config(client_app, run_config),
            num_supernodes=num_nodes,
            backend_config=backend_config,
        )
