"""Seeds that are the same in every process and every run (unlike Python's salted `hash()`)."""

from __future__ import annotations

import hashlib


def seed_from(*parts: object) -> int:
    """A stable 63-bit seed from any parts, e.g. seed_from(seed, "ldm", rank, step)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
