"""Block checksums of chunk data: XXH3-64 of every 4 KiB block (docs/FORMAT.md, "sums").

Chosen by measurement on the development machine (per 4 KiB block, called from Python on
a memoryview slice; ``python bench/hashes.py``): xxhash's XXH3-64 0.13 µs, crc32c 0.31 µs,
zlib.crc32 0.74 µs; over 1 MiB in 4 KiB blocks 52 / 75 / 206 µs. XXH3 is not a CRC, but
for detecting damage (not an adversary) a 64-bit hash of good quality does as well, and
its call overhead is what dominates at this block size.
"""

from __future__ import annotations

from array import array

import xxhash

BLOCK = 4096
SUM_SIZE = 8
_hash = xxhash.xxh3_64_intdigest
ZERO_SUM = _hash(bytes(BLOCK))


def sums_of(view: memoryview) -> array:
    """The sums of a block-aligned buffer, one per block."""
    return array("Q", [_hash(view[i:i + BLOCK]) for i in range(0, len(view), BLOCK)])


def sum_of(block: memoryview) -> int:
    return _hash(block)


def zero_sums(n: int) -> array:
    return array("Q", [ZERO_SUM]) * n


def mismatches(view: memoryview, sums) -> list[int]:
    """Indexes of the blocks of ``view`` whose sum differs from ``sums`` (an array or a
    u64 memoryview)."""
    have = sums_of(view)
    if have == sums:
        return []
    return [i for i in range(len(have)) if i >= len(sums) or have[i] != sums[i]]
