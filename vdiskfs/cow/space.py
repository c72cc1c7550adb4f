"""The space map: which slots and page ids are free, and which may change in place.

One owner for all of it (as dm-thin's space maps): the free-slot heap and the page-id
free list with their high-water marks, the frees that wait for a commit (invariant 2:
nothing freed is reused before the free is durable), the *unstable* sets, and the commits
in flight. Everything here is derived: it is rebuilt from the refcounts at open
(``Space(meta)``) and learns of every dropped reference from ``Metadata`` (it is the
metadata's ``drops`` listener), so nothing here is ever written to disk.

Unstable: a slot or page whose refcount dropped since the last durable commit may still
be shared in the durable state (after a crash the VDisk that let go of it is back), so
its data must not be overwritten in place until the commit that recorded the drop is
durable. The same holds, until their commit ends, for the sets of commits in flight.

The commit protocol (commit.py): ``begin_commit`` takes everything accumulated so far
into a ``Token``; after the journal write ``finish(token)`` makes its frees reusable and
its unstable entries stable; after a failure ``abort(token)`` puts everything back for
the next try.

Deferred punches (the daemon's puncher, fs/puncher.py): a commit may make its frees
reusable before their space goes back to the backing filesystem. Such slots are
*unpunched*; ``take_punch`` lends some to a punch (no allocation hands them out until
``punch_done``), and a slot reused first simply leaves the set: its space is in use again.
"""

from __future__ import annotations

import heapq
from array import array

from .meta import Drops, Metadata


class Token:
    """What one commit made durable once it finishes."""
    __slots__ = ("slots", "pids", "unstable_slots", "unstable_pages")

    def __init__(self, slots: list[int], pids: list[int], unstable_slots: set[int],
                 unstable_pages: set[int]):
        self.slots = slots
        self.pids = pids
        self.unstable_slots = unstable_slots
        self.unstable_pages = unstable_pages


class Space(Drops):
    def __init__(self, meta: Metadata):
        self.next_slot = _used_len(meta.slot_ref)
        # A min-heap: the lowest free slot goes first, so data freed and rewritten in order
        # lands in order in the data file (and reads back in long preadv runs).
        self.free_slots = [s for s in range(1, self.next_slot) if not meta.slot_ref[s]]
        self.next_pid = _used_len(meta.page_ref)
        self.free_pids = [p for p in range(self.next_pid - 1, 0, -1) if not meta.page_ref[p]]
        self.freed_slots: list[int] = []     # freed since the last commit began
        self.freed_pids: list[int] = []
        self.unstable_slots: set[int] = set()
        self.unstable_pages: set[int] = set()
        self.inflight: list[Token] = []
        self.unpunched: set[int] = set()   # free, reusable, space maybe still held
        self.punching: set[int] = set()    # lent to a punch in progress: not allocatable
        self._held: list[int] = []         # popped off the heap while being punched
        self._queue: list[int] = []        # unpunched slots, sorted, largest first
        # Slots written (or born) since the last cooling pass: the others may go cold.
        self.written = bytearray(len(meta.slot_ref))
        meta.drops = self

    # ------------------------------------------------------------ allocation
    def alloc_slot(self) -> int:
        while self.free_slots:
            s = heapq.heappop(self.free_slots)
            if s in self.punching:
                self._held.append(s)
                continue
            if self.unpunched:
                self.unpunched.discard(s)
            return s
        s = self.next_slot
        self.next_slot += 1
        return s

    def alloc_pid(self) -> int:
        if self.free_pids:
            return self.free_pids.pop()
        p = self.next_pid
        self.next_pid += 1
        return p

    def give_back(self, slots: list[int] = (), pids: list[int] = ()) -> None:
        """Slots and page ids taken by ``alloc_*`` that nothing came to point at (a write
        that failed before its ops were applied): free at once, no commit needed."""
        for s in slots:
            heapq.heappush(self.free_slots, s)
        self.free_pids.extend(pids)

    # ------------------------------------------------------------ the drops listener
    def slot(self, slot: int, freed: bool) -> None:
        self.unstable_slots.add(slot)
        if freed:
            self.freed_slots.append(slot)

    def page(self, pid: int, freed: bool) -> None:
        self.unstable_pages.add(pid)
        if freed:
            self.freed_pids.append(pid)

    def hold_page(self, pid: int) -> None:
        """No in-place writes into page ``pid`` until the next commit is durable (a clone
        end that a crash could still undo: cow/clones.py)."""
        self.unstable_pages.add(pid)

    def note_written(self, slot: int) -> None:
        if slot >= len(self.written):
            self.written.extend(bytes(max(slot + 1, 2 * len(self.written)) - len(self.written)))
        self.written[slot] = 1

    def to_cool(self, meta: Metadata, keep: set[int], everything: bool = False) -> array:
        """Hot slots not written since the last pass (``everything``: all hot slots),
        except ``keep``; starts the next pass. Their last writes came before this call,
        so the commit that journals their ``cold`` op syncs them first."""
        written = self.written
        slots = array("Q", [s for s in meta.hot_slots() if s not in keep and (
            everything or s >= len(written) or not written[s])])
        self.written = bytearray(len(written))
        return slots

    # ------------------------------------------------------------ queries
    def stable(self, pid: int, slot: int) -> bool:
        """May the data of ``slot`` on page ``pid`` (both with refcount 1) change in
        place? Not while a drop of either is not durable."""
        if pid in self.unstable_pages or slot in self.unstable_slots:
            return False
        for t in self.inflight:
            if pid in t.unstable_pages or slot in t.unstable_slots:
                return False
        return True

    def frees_pending(self) -> bool:
        """Are slots waiting for a commit before they can be reused?"""
        return bool(self.freed_slots or self.inflight)

    def punches_pending(self) -> bool:
        return bool(self.unpunched or self.punching)

    # ------------------------------------------------------------ commits
    def begin_commit(self) -> Token:
        t = Token(self.freed_slots, self.freed_pids, self.unstable_slots, self.unstable_pages)
        self.freed_slots, self.freed_pids = [], []
        self.unstable_slots, self.unstable_pages = set(), set()
        self.inflight.append(t)
        return t

    def finish(self, t: Token, unpunched: bool = False) -> None:
        """``unpunched``: the commit left punching the freed slots to the puncher."""
        for s in t.slots:
            heapq.heappush(self.free_slots, s)
        if unpunched:
            self.unpunched.update(t.slots)
        self.free_pids.extend(t.pids)
        self.inflight.remove(t)

    # ------------------------------------------------------------ deferred punches
    def take_punch(self, limit: int) -> list[int]:
        """Up to ``limit`` unpunched free slots (ascending, so that runs punch in one
        call), lent to a punch. The set is sorted once per pass over it, not per batch:
        a slot freed meanwhile waits for the next pass, one reused is skipped."""
        slots: list[int] = []
        for _ in range(2):
            if not self._queue:
                self._queue = sorted(self.unpunched, reverse=True)
            queue, unpunched = self._queue, self.unpunched
            while queue and len(slots) < limit:
                s = queue.pop()
                if s in unpunched:
                    slots.append(s)
            if slots or not unpunched:
                break
        self.unpunched.difference_update(slots)
        self.punching.update(slots)
        return slots

    def owe_punches(self) -> None:
        """Every free slot owes a punch (at open: a crash may have left some unpunched)."""
        self.unpunched.update(self.free_slots)

    def punch_done(self, slots: list[int], ok: bool = True) -> None:
        """The punch of ``slots`` ended (``ok``: their space is back; otherwise they go
        back to the unpunched set): they are allocatable again."""
        self.punching.difference_update(slots)
        if not ok:
            self.unpunched.update(slots)
        if self._held:
            back = [s for s in self._held if s not in self.punching]
            self._held = [s for s in self._held if s in self.punching]
            for s in back:
                heapq.heappush(self.free_slots, s)

    def abort(self, t: Token) -> None:
        self.freed_slots[:0] = t.slots
        self.freed_pids[:0] = t.pids
        self.unstable_slots |= t.unstable_slots
        self.unstable_pages |= t.unstable_pages
        self.inflight.remove(t)

    # ------------------------------------------------------------ check
    def problems(self, meta: Metadata) -> list[str]:
        """Disagreements with the refcounts (the engine tests' check; fsck's space map)."""
        out = []
        free = self.free_slots + self._held
        if len(set(free)) != len(free):
            out.append("a slot is on the free list twice")
        for s in free:
            if s < len(meta.slot_ref) and meta.slot_ref[s]:
                out.append(f"free slot {s} is in use")
        for p in self.free_pids:
            if p < len(meta.page_ref) and meta.page_ref[p]:
                out.append(f"free page id {p} is in use")
        for s in range(self.next_slot, len(meta.slot_ref)):
            if meta.slot_ref[s]:
                out.append(f"slot {s} is in use above the high-water mark {self.next_slot}")
                break
        return out


def _used_len(a: array) -> int:
    """1 + the highest index with a nonzero value (at least 1: index 0 is never used)."""
    n = len(a)
    while n > 1 and not a[n - 1]:
        n -= 1
    return max(n, 1)
