"""docs/FORMAT.md is the one description of the on-disk format: it must name exactly the
ops (with their arguments and versions), record fields and property keys the code uses."""

from __future__ import annotations

import os
import re

import pytest

from vdiskfs.cow import codec, layout, ops, props, records
from vdiskfs.cow.meta import Metadata

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "FORMAT.md")


def section(title: str) -> str:
    with open(DOC) as f:
        text = f.read()
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    assert m, f"FORMAT.md has no section {title!r}"
    return m.group(1)


def table_rows(title: str) -> list[list[str]]:
    rows = []
    for line in section(title).splitlines():
        if line.startswith("|") and not re.match(r"\|\s*-", line):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[1:]   # without the heading row


def names_in(cell: str) -> list[str]:
    return re.findall(r"`([a-z_]+)`", cell)


def test_op_table_matches_the_code():
    doc = {}
    for name, args, since, _ in table_rows("Ops"):
        (op,) = names_in(name)
        doc[op] = ([a.strip() for a in args.split(",")], int(since))
    code = {name: (list(op.fields), op.since) for name, op in ops.OPS.items()}
    assert doc == code


@pytest.mark.parametrize("title,fields", [
    ("Clone job records", set(records.FIELDS)),
    ("VDisk properties", set(props.KEYS)),
    ("`checkpoint`", set(Metadata(4096, 4).to_record(0))),
    ("`pool` (the header)", set(layout.header_record(4096, store={"kind": "rados"}))),
])
def test_record_tables_match_the_code(title, fields):
    doc = set()
    for row in table_rows(title):
        doc.update(names_in(row[0]))
    assert doc == fields


def test_the_documented_version_is_the_code_version():
    assert f"Format\nversion: **{codec.FORMAT_VERSION}**" in open(DOC).read()
    versions = [int(row[0]) for row in table_rows("Versions")]
    assert versions[-1] == codec.FORMAT_VERSION


@pytest.mark.parametrize("op", [
    ["eset", 1, "x", 2],            # a str where an int goes
    ["eset", 1, 2],                 # an argument short
    ["eset", 1, 2, 3, 4],           # one too many
    ["vsize", 1, True],             # bool is not an int here
    ["vnew", 1, "A", 0, []],        # props not a map
    ["nosuch", 1],
    "eset",
    [],
])
def test_ops_are_checked_against_their_signature(op):
    with pytest.raises(codec.FormatError):
        ops.check(op)


@pytest.mark.parametrize("op", [
    ["vset", 1, "bogus", 3],        # not a VDisk property
    ["vset", 1, "name", 5],         # a name is a str
    ["jset", 1, "done", []],        # not settable
    ["jset", 1, "state", "Sleeping"],
    ["jset", 1, "cursor", "3"],
    ["jdone", 9, 0],                # no such job
])
def test_ops_that_do_not_fit_the_state_are_format_errors(op):
    m = Metadata(4096, 4)
    m.apply(["vnew", 1, "A", 0, props.new("0" * 32, 1, 0o600, 0, 0)])
    m.apply(["jnew", records.Job(id=1, src=1, dst=1, src_name="A", dst_name="A").to_record()])
    with pytest.raises(codec.FormatError):
        m.apply(op)


@pytest.mark.parametrize("rec", [
    {"id": 1, "src": 1, "dst": 2, "src_name": "A"},                 # dst_name missing
    {"id": 1, "src": 1, "dst": 2, "src_name": "A", "dst_name": "B", "extra": 1},
    {"id": "1", "src": 1, "dst": 2, "src_name": "A", "dst_name": "B"},
    {"id": 1, "src": 1, "dst": 2, "src_name": "A", "dst_name": "B", "done": ["x"]},
    [1, 2, 3],
])
def test_bad_job_records_are_format_errors(rec):
    with pytest.raises(codec.FormatError):
        records.Job.from_record(rec)


def test_job_record_round_trip():
    job = records.Job(id=3, src=1, dst=2, src_name="A", dst_name="B", done=[4, 5],
                      total=7, started_ns=11)
    again = records.Job.from_record(codec.unpackb(codec.packb(job.to_record())))
    assert again.to_record() == job.to_record()


@pytest.mark.parametrize("data", [b"\xc1", b"\x92\x01", b"\x81", b"\xd9\x05ab"])
def test_undecodable_msgpack_is_a_format_error(data):
    with pytest.raises(codec.FormatError, match="undecodable"):
        codec.unpackb(data, "test record")


@pytest.mark.parametrize("big", [0, 1, codec.BY_REFERENCE - 1, codec.BY_REFERENCE, 3 << 20])
def test_checkpoint_pieces_are_the_frame_packb_makes(big):
    """A checkpoint is framed from pieces (large arrays by reference, off the loop): the
    same bytes as frame_record, so readers need nothing new."""
    m = Metadata(4096, 16)
    rec = m.to_record(7, "u")
    rec["pages"] = os.urandom(big)
    rec["slot_ref"] = bytes(big)
    pieces = codec.frame_record_pieces(rec)
    assert b"".join(pieces) == codec.frame_record(rec)
    payload, end = codec.frame_at(b"".join(pieces), 0)
    assert codec.unpack_map(payload, "t") == rec and end == sum(map(len, pieces))


def test_checkpoint_record_shares_nothing_mutable(tmp_path):
    """Packed in another thread while the loop changes the state: the record is a copy."""
    m = Metadata(4096, 16)
    m.apply(["vnew", 1, "A", 4096 * 64, {}])
    rec = m.to_record(1)
    m.vdisks[1].props["serial"] = "changed"
    assert "serial" not in rec["vdisks"][0]["props"]
