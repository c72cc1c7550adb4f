"""The sections of the suite, one module each (bench/sections/NAME.py), in the order they
run; ``--only`` takes these names. Each module has ``measure(suite)``."""

from __future__ import annotations

import importlib

SECTIONS = ("seq", "fio", "qd", "cache", "ext4", "fresh", "clone", "mount", "lat", "writer",
            "scrub", "thin", "nbd")


def measure_fn(name: str):
    """The ``measure(suite)`` of section ``name`` (imported on first use)."""
    return importlib.import_module(f"bench.sections.{name}").measure
