"""Seeds as pure functions of (seed, stage, class, index): outputs never depend on rank, world size or batch size."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (stored as int32 in `labels.safetensors`)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**31 - 1)
