"""Checksums of arrays, computed on device, so a checkpoint can prove its bytes came back unchanged.

An array's fingerprint is ``sum_i bits[i] * (2i + 1) mod 2**32`` over its elements' bit patterns
(as uint32). Integer sums are exact in any order, so the value is the same for any sharding,
mesh or process count; and since every weight ``2i + 1`` is odd (invertible mod 2**32), any change
to a single element always changes it. A NaN written over a weight does too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _bits(x: jax.Array) -> jax.Array:
    """The array's elements as uint32 bit patterns (narrower types zero-extended)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
    bits = _bits(jnp.asarray(x)).reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


_fingerprints = jax.jit(lambda tree: jax.tree.map(_fingerprint, tree))


def fingerprints(tree: Any) -> dict[str, int]:
    """``{path: checksum}`` for every array leaf of ``tree`` (paths as ``jax.tree_util.keystr`` writes them)."""
    sums = jax.device_get(_fingerprints(tree))
    return {jax.tree_util.keystr(path): int(value) for path, value in jax.tree_util.tree_leaves_with_path(sums)}


def mismatches(stored: dict[str, int], tree: Any) -> list[str]:
    """The paths whose checksum differs from ``stored`` (or that one side lacks)."""
    now = fingerprints(tree)
    return sorted(p for p in stored.keys() | now.keys() if stored.get(p) != now.get(p))
