"""The Flower ServerApp of fed-dfkd (DESIGN.md §3): the round loop on a ``Grid``.

- :mod:`server.loop`: the federation's round loop, run settings, evaluation, checkpoints and the
  run folder; usable with any ``flwr.serverapp.Grid`` (Flower's, or the in-process engine's);
- :mod:`server.app`: ``app``, the ``ServerApp`` that reads its settings from the run config.
"""
