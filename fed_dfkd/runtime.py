"""Runtime settings shared by the commands: device, threads, resume identity."""

from __future__ import annotations

import dataclasses

import torch

from fed_dfkd.config import ExperimentConfig, RuntimeConfig, config_hash


def resolve_device(runtime: RuntimeConfig) -> torch.device:
    """Apply the thread count (process-wide); returns the device."""
    if runtime.threads is not None:
        torch.set_num_threads(runtime.threads)
    return checked_device(runtime.device, "runtime.device")


def checked_device(name: str, option: str) -> torch.device:
    """The device ``name`` (``auto``: CUDA when available), or a UserError naming ``option`` for
    CUDA without a CUDA device, a name torch does not parse or a CUDA index this machine does not
    have (the last two would otherwise fail later with a traceback)."""
    from fed_dfkd.errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{option} is {name!r} but no CUDA device is available; use cpu or auto")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{option} {name!r} is not a device; use cpu, auto, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise UserError(f"{option} is {name!r} but this machine has {count} CUDA device(s), "
                            f"cuda:0 to cuda:{count - 1}")
    return device


def resume_key(cfg: ExperimentConfig) -> str:
    """Hash of everything that determines a run's results: all but how it is displayed/run."""
    runtime = dataclasses.replace(cfg.runtime, progress="auto", threads=None, device="cpu",
                                  memory_format="contiguous")
    return config_hash(dataclasses.replace(cfg, runtime=runtime))
