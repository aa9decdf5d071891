"""Deterministic random streams derived from structured seeds.

Every random choice in the data layer (splits, subsets, epoch shuffles, per-batch augmentation)
draws from its own CPU ``torch.Generator`` seeded by a hash of a tag and integers, e.g.
``generator("shuffle", seed, epoch)``. Streams are therefore independent of each other, of the
global torch RNG and of the device the data lives on, and any of them can be re-created exactly
(which is what makes mid-epoch resume exact).
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(tag: str, *parts: int) -> int:
    """A 63-bit seed that depends on ``tag`` and every integer in ``parts``."""
    text = "\x1f".join([tag, *(str(int(p)) for p in parts)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(tag: str, *parts: int) -> torch.Generator:
    """A fresh CPU generator seeded with ``derive_seed(tag, *parts)``."""
    return torch.Generator().manual_seed(derive_seed(tag, *parts))
