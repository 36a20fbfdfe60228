"""Runtime settings shared by the commands: device, threads, resume identity."""

from __future__ import annotations

import dataclasses

import torch

from fed_dfkd.config import ExperimentConfig, RuntimeConfig, config_hash


def resolve_device(runtime: RuntimeConfig) -> torch.device:
    if runtime.threads is not None:
        torch.set_num_threads(runtime.threads)
    if runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if runtime.device.startswith("cuda") and not torch.cuda.is_available():
        from fed_dfkd.errors import UserError

        raise UserError(f"runtime.device is {runtime.device!r} but no CUDA device is available")
    return torch.device(runtime.device)


def resume_key(cfg: ExperimentConfig) -> str:
    """Hash of everything that determines a run's results: all but how it is displayed/run."""
    runtime = dataclasses.replace(cfg.runtime, progress="auto", threads=None, device="cpu")
    return config_hash(dataclasses.replace(cfg, runtime=runtime))
