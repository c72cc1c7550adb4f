"""Helpers of the clone tests through a mount (t4_clone, t4_clone_e2e): the options of a
pool whose clones can be watched, and reading and following ``.ctl/status``.

``SLOW``: a pool with 4 KiB chunks (one map page then covers 4 MiB of a VDisk) and clone
jobs limited to 8 MiB of mapped source data per second, so that a source holding 40 MiB of
data takes about five seconds to clone, in ten visible steps.
"""

from __future__ import annotations

import os
import re
import time

from support.common import Mount, daemon_log

# A pool with 4 KiB chunks and rate-limited clone jobs (see the module docstring).
SLOW = ("--chunk-size", "4K", "--clone-speed", "8M")
FINAL = ("Completed", "Error", "Cancelled")
HEADER = ["Source", "Destination", "Progress"]


def ctl_path(mnt: str, name: str = "clone") -> str:
    return os.path.join(mnt, ".ctl", name)


def read_ctl(mnt: str, name: str = "status") -> str:
    with open(ctl_path(mnt, name)) as f:
        return f.read()


def valid_progress(state: str) -> bool:
    return state in FINAL or re.fullmatch(r"(\d|[1-9]\d)%", state) is not None


def parse_status(text: str) -> list[tuple[str, str, str]]:
    lines = text.splitlines()
    assert lines and lines[0].split() == HEADER, f"bad status header:\n{text}"
    rows = []
    for line in lines[1:]:
        fields = line.split()
        assert len(fields) == 3 and valid_progress(fields[2]), f"bad status row {line!r}:\n{text}"
        rows.append(tuple(fields))
    return rows


def status_rows(mnt: str) -> list[tuple[str, str, str]]:
    return parse_status(read_ctl(mnt))


def state_of(mnt: str, src: str, dst: str) -> str | None:
    """Progress of the newest SRC -> DST row (None when not listed)."""
    mine = [r[2] for r in status_rows(mnt) if r[:2] == (src, dst)]
    return mine[-1] if mine else None


def pct(state: str | None) -> int | None:
    return int(state[:-1]) if state and state.endswith("%") else None


def follow(m: Mount, src: str, dst: str, timeout: float = 60.0,
           interval: float = 0.05) -> list[str]:
    """Poll the row SRC -> DST until it ends; returns the distinct states seen in order,
    having checked that the percentage only went up and that only the last is final."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        st = state_of(m.mnt, src, dst)
        assert st is not None, f"{src} -> {dst} is not listed: {status_rows(m.mnt)}"
        if not seen or seen[-1] != st:
            seen.append(st)
        if st in FINAL:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{src} -> {dst} not finished after {timeout:.0f}s: "
                                 f"{seen}\n{daemon_log(m.pool, tail=30)}")
        time.sleep(interval)
    pcts = [pct(s) for s in seen[:-1]]
    assert None not in pcts, f"a final state before the end: {seen}"
    assert pcts == sorted(pcts), f"progress went down: {seen}"
    return seen
