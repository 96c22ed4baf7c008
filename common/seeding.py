"""Seeds derived from names, so results never depend on arrival order or hash salt."""

from __future__ import annotations

import hashlib


def seeded_share(keys: list[str], fraction: float, *seed_parts: object) -> list[str]:
    """round(fraction * n) of the keys (at least one), drawn with a seed from `seed_parts`,
    sorted; all of them (as given) when the fraction is 1."""
    if fraction >= 1.0 or not keys:
        return list(keys)
    import numpy as np

    count = max(1, int(round(fraction * len(keys))))
    rng = np.random.default_rng(stable_seed(*seed_parts))
    return sorted(keys[i] for i in rng.choice(len(keys), count, replace=False))


def stable_seed(*parts: object) -> int:
    """A 63-bit seed that depends only on its parts (identical on every machine)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
