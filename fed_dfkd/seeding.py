"""Named, derived random streams.

Every random draw in a run comes from a ``torch.Generator`` seeded by
``derive_seed(runtime.seed, purpose, round, ...)``. A round's draws therefore depend only on
the config seed and the round index: a resumed run, a federated run and a centralised run with
the same seed see exactly the same latent vectors.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed from ``seed`` and any number of labels (strings or integers)."""
    text = "/".join([str(int(seed))] + [str(k) for k in keys])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def make_rng(seed: int, *keys: object, device: torch.device | str = "cpu") -> torch.Generator:
    rng = torch.Generator(device=device)
    rng.manual_seed(derive_seed(seed, *keys))
    return rng
