"""A power cut during NBD writes (issue 14): every write acknowledged by a FUA reply, and
every write answered before a FLUSH that was answered, survives the cut; the rest may or
may not (support/powerloss.py: the rig, the model, the verdict).

The writer is tests/support/nbd_raw.py's client on the daemon's Unix socket: one request
at a time, so a reply names exactly one write and the model learns of every
acknowledgement as it happens. Only replies received before the cut count (the rig sets
``cut_event`` before it cuts)."""

from __future__ import annotations

import os
import random
import threading
from collections import Counter

import pytest

from support import nbd_raw
from support.powerloss import SECTOR, Rig, payload

pytestmark = [pytest.mark.mount, pytest.mark.loop]

KiB, MiB = 1 << 10, 1 << 20
CUTS = int(os.environ.get("VDISKFS_POWERLOSS_CUTS", "3"))


@pytest.fixture
def rig(need_loop, kmounts, tmp_path):
    sock = str(tmp_path / "nbd.sock")
    r = Rig(str(tmp_path / "rig"), kmounts, 64 * KiB, ["--nbd", f"unix:{sock}"], "nbd")
    r.sock = sock
    r.create()
    yield r
    r.cleanup()


class NbdWriter(threading.Thread):
    """Random 512-byte-aligned writes of tagged sectors over NBD, some with FUA, and now
    and then a FLUSH; until the cut."""

    def __init__(self, rig: Rig, model, rng: random.Random):
        super().__init__(daemon=True)
        self.rig, self.m, self.rng = rig, model, rng
        self.stats: Counter = Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        rig, m, rng = self.rig, self.m, self.rng
        try:
            s = nbd_raw.raw_client(rig.sock)
            assert nbd_raw.go(s, m.name.encode()) == m.size
            answered: list[int] = []          # writes replied to since the last flush
            while not rig.cut_event.is_set():
                if rng.random() < 0.1:
                    err = nbd_raw.request(s, nbd_raw.FLUSH, 0, 0)
                    if err or rig.cut_event.is_set():
                        break
                    m.ack(answered)
                    answered = []
                    self.stats["flush"] += 1
                    continue
                n = rng.choice((1, 1, 8, 64, 256)) * SECTOR
                off = rng.randrange(0, (m.size - n) // SECTOR + 1) * SECTOR
                seq = rig.next_seq()
                data = payload(m.tag, seq, off, n)
                m.record(seq, off, data)
                fua = rng.random() < 0.2
                err = nbd_raw.request(s, nbd_raw.WRITE, off, n, nbd_raw.FUA if fua else 0,
                                      data, cookie=seq)
                if err or rig.cut_event.is_set():
                    break
                if fua:
                    m.ack([seq])
                    self.stats["fua write"] += 1
                else:
                    answered.append(seq)
                    self.stats["write"] += 1
        except (OSError, AssertionError) as e:
            if not rig.cut_event.is_set():
                self.error = e


def test_power_cut_during_nbd_writes_keeps_flushed_and_fua_writes(rig):
    rng = random.Random(int(os.environ.get("VDISKFS_SOAK_SEED", "1414")))
    m = rig.new_vdisk("NBDV", 8 * MiB)
    stats = Counter()
    for i in range(CUTS):
        w = NbdWriter(rig, m, random.Random(rng.getrandbits(64)))
        w.start()
        w.join(rng.uniform(0.3, 1.5))
        assert w.is_alive(), f"the NBD writer ended before the cut: {w.error!r}"
        rig.cut()
        w.join(30)
        assert not w.is_alive() and w.error is None, w.error
        stats.update(w.stats)
        rig.crash()
        rig.recover()
        verdict = rig.verify(f"nbd cut {i}")
        assert verdict.ok, verdict
    assert stats["fua write"] and stats["flush"], stats
    rig.finish()
    print(f"\nnbd power cuts: {CUTS}; " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
