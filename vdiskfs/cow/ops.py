"""The metadata operations: one table that drives both dispatch and validation.

Every change to the persistent metadata is an *op*, a msgpack list ``[name, arg, ...]``,
applied by ``Metadata.apply`` live and again in journal replay (docs/FORMAT.md, "Ops",
says what each one means). An op is checked against its signature here before its handler
runs, so a journal record that is not one of these exact shapes is a ``FormatError``
naming it, never a KeyError or TypeError deep in a handler.
"""

from __future__ import annotations

from typing import Any

from .codec import FormatError

INT = (int,)
STR = (str,)
ANY = None
NAME = (str, type(None))   # None: unlinked while open


class Op:
    __slots__ = ("name", "fields", "types", "since")

    def __init__(self, name: str, since: int, *fields: tuple[str, tuple | None]):
        self.name = name
        self.since = since              # first format version that writes it
        self.fields = tuple(f for f, _ in fields)
        self.types = tuple(t for _, t in fields)

    def check(self, args: list) -> None:
        if len(args) != len(self.types):
            raise FormatError(f"operation {self.name} takes {len(self.types)} arguments "
                              f"({', '.join(self.fields)}), not {len(args)}")
        for name, types, value in zip(self.fields, self.types, args):
            if types is not None and type(value) not in types:
                raise FormatError(f"operation {self.name}: {name} has type "
                                  f"{type(value).__name__}")


def _table(*ops: Op) -> dict[str, Op]:
    return {op.name: op for op in ops}


OPS = _table(
    Op("vnew", 1, ("vid", INT), ("name", STR), ("size", INT), ("props", (dict,))),
    Op("vset", 1, ("vid", INT), ("key", STR), ("value", ANY)),
    Op("vsize", 1, ("vid", INT), ("size", INT)),
    Op("pcow", 1, ("vid", INT), ("pidx", INT), ("pid", INT)),
    Op("eset", 1, ("vid", INT), ("cidx", INT), ("slot", INT)),
    Op("pset", 2, ("vid", INT), ("cidx", INT), ("slot", INT), ("base", INT), ("mask", INT)),
    Op("pmask", 2, ("slot", INT), ("mask", INT)),
    Op("cold", 3, ("slots", (bytes,))),
    Op("vshare", 1, ("src", INT), ("dst", INT), ("p0", INT), ("p1", INT)),
    Op("pdrop", 4, ("vid", INT), ("pidx", INT)),
    Op("vdel", 1, ("vid", INT)),
    Op("jnew", 1, ("job", (dict,))),
    Op("jset", 1, ("id", INT), ("key", STR), ("value", ANY)),
    Op("jdone", 1, ("id", INT), ("pidx", INT)),
    Op("jdel", 1, ("id", INT)),
)


def check(op: Any) -> tuple[str, list]:
    """(name, arguments) of a well-formed op; ``FormatError`` otherwise."""
    if not isinstance(op, list) or not op or not isinstance(op[0], str) or op[0] not in OPS:
        raise FormatError(f"unknown metadata operation {op!r:.80}")
    args = op[1:]
    OPS[op[0]].check(args)
    return op[0], args
