"""Typed records kept in the metadata: clone jobs (docs/FORMAT.md, "Clone job records").

A record travels as a msgpack map (in op ``jnew`` and in the checkpoint's ``jobs``) and
lives in memory as a dataclass: fields are named once, here, and a record that lacks one
or carries a wrong type is a ``FormatError`` instead of a KeyError somewhere later.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .codec import FormatError

RUNNING = "running"
COMPLETED = "Completed"
ERROR = "Error"
CANCELLED = "Cancelled"
FINISHED = (COMPLETED, ERROR, CANCELLED)
STATES = (RUNNING,) + FINISHED


@dataclass(eq=False)
class Job:
    """A clone job: ``src`` is shared into ``dst`` page by page from ``cursor`` on."""
    id: int
    src: int                       # source vid
    dst: int                       # destination vid (prop clone_job = id until Completed)
    src_name: str
    dst_name: str
    state: str = RUNNING           # one of STATES
    cursor: int = 0                # pages below it are the destination's
    done: list[int] = field(default_factory=list)   # pages at or past the cursor, handled
    total: int = 0                 # pages mapped at the start
    progress: int = 0              # of those, pages shared so far
    bytes: int = 0                 # data bytes mapped at the start
    started_ns: int = 0
    ended_ns: int | None = None
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def to_record(self) -> dict:
        d = asdict(self)
        d["done"] = list(self.done)
        return d

    @classmethod
    def from_record(cls, rec: object, what: str = "clone job") -> "Job":
        if not isinstance(rec, dict):
            raise FormatError(f"{what}: not a map")
        unknown = set(rec) - FIELDS.keys()
        if unknown:
            raise FormatError(f"{what}: unknown fields {sorted(map(str, unknown))}")
        for name, types in FIELDS.items():
            if name in REQUIRED and name not in rec:
                raise FormatError(f"{what}: field {name!r} is missing")
            if name in rec and type(rec[name]) not in types:
                raise FormatError(f"{what}: field {name!r} has type "
                                  f"{type(rec[name]).__name__}")
        job = cls(**rec)
        if job.state not in STATES or not all(type(p) is int for p in job.done):
            raise FormatError(f"{what}: bad state {job.state!r} or done list")
        job.done = list(job.done)
        return job

    def check_field(self, key: str, value: object) -> None:
        """Validate a ``jset`` (replay must not invent fields or types)."""
        if key not in FIELDS or key in ("id", "src", "dst", "done"):
            raise FormatError(f"jset of field {key!r}")
        if type(value) not in FIELDS[key] or (key == "state" and value not in STATES):
            raise FormatError(f"jset {key}={value!r:.40}")


_TYPES = {"int": (int,), "str": (str,), "list[int]": (list,), "int | None": (int, type(None)),
          "str | None": (str, type(None))}
FIELDS = {f.name: _TYPES[f.type] for f in fields(Job)}
REQUIRED = ("id", "src", "dst", "src_name", "dst_name")
