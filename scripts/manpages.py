"""Write the man pages vdiskfs.1 and qclone.1 into OUTDIR, generated from the argparse
parsers (vdiskfs.cli) by argparse-manpage, so they never drift from ``--help``.

    python scripts/manpages.py OUTDIR        (scripts/setup.sh: /usr/local/share/man/man1)

Exits 1 with one line on stderr if argparse-manpage is not installed (nothing written).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Extra sections, in roff. Each paragraph is a list of (tag, text) items (.TP) or a string.
EXIT_VDISKFS = [
    ("0", "success."),
    ("1", "an error, said in one line on stderr (never a traceback); "
          "\\fBscrub\\fR: also when it found damaged blocks."),
    ("2", "a usage error (unknown command or option, bad size)."),
    ("0, 1, 4, 8", "\\fBfsck\\fR, as e2fsck(8): 0 clean, 1 errors corrected, "
                   "4 errors left uncorrected, 8 could not check (pool in use, not a pool, "
                   "I/O error)."),
]
EXIT_QCLONE = [
    ("0", "success."),
    ("1", "an error, said in one line on stderr; with \\fB\\-w\\fR also when the clone "
          "ends Cancelled or Error."),
    ("2", "a usage error."),
]
ENVIRONMENT = [
    ("VDISKFS_MOUNT", "the vdiskfs mount to use when \\fB\\-\\-mount\\fR is not given; "
                      "without either, the only vdiskfs mount in /proc/mounts."),
]
FILES_CTL = [
    ("MNT/.ctl/clone", "write one clone command per write: \\fISRC DST\\fR, "
                       "\\fIcancel SRC\\fR, \\fIpurge\\fR (or the \\-s/\\-d/\\-c/\\-p flags)."),
    ("MNT/.ctl/status, MNT/.ctl/jobs", "the clone table (jobs: with elapsed time and bytes "
                                       "shared)."),
]
FILES_VDISKFS = FILES_CTL + [
    ("MNT/.ctl/scrub", "write \\fIstart\\fR or \\fIcancel\\fR; read the scrub's state."),
    ("MNT/.ctl/vdisks", "the listing of VDisks and pool as JSON (\\fBlist\\fR, "
                        "\\fBinfo\\fR)."),
    ("POOL/daemon.log", "the mount daemon's log."),
    ("POOL/lock", "the pid of the process holding the pool (daemon or fsck)."),
]

PAGES = {
    "vdiskfs": {
        "name": "virtual disks with instant copy-on-write clones, as files in a FUSE mount",
        "description": (
            "vdiskfs keeps virtual disks (VDisks) in a pool directory and shows each as a "
            "regular file in its mount: create one with \\fBtruncate \\-s 10G MNT/FOO\\fR, "
            "attach it with \\fBlosetup\\fR or a VM, clone it with \\fBqclone\\fR(1). VDisks "
            "are thin (unwritten ranges take no space), every block is checksummed, and a "
            "clone shares the source's chunks until either is written. Properties are "
            "extended attributes \\fBuser.vdisk.*\\fR (\\fBgetfattr \\-d \\-m \\- MNT/FOO\\fR)."
            "\n.PP\n"
            "mount(8) and fstab call it as \\fBvdiskfs\\fR \\fIPOOL MNT\\fR \\fB\\-o\\fR "
            "\\fIOPTIONS\\fR (type \\fBfuse.vdiskfs\\fR, through mount.fuse3)."),
        "exit": EXIT_VDISKFS,
        "files": FILES_VDISKFS,
        "see_also": "qclone(1), mount.fuse3(8), fstab(5), losetup(8), fstrim(8), getfattr(1), "
                    "e2fsck(8); docs/SPEC.md, docs/MOUNTING.md, docs/NBD.md and "
                    "docs/RELIABILITY.md in the vdiskfs source.",
    },
    "qclone": {
        "name": "start, list and cancel clones of VDisks in a vdiskfs mount "
                "(QUADStor's qclone flags)",
        "description": (
            "\\fBqclone\\fR is \\fBvdiskfs clone\\fR under QUADStor's name: "
            "\\fBqclone \\-s FOO \\-d BAR\\fR clones FOO to the new VDisk BAR (instantly "
            "usable once Completed; until then BAR cannot be opened), \\fBqclone \\-l\\fR "
            "lists the clone operations (Source Destination Progress), \\fBqclone \\-s FOO "
            "\\-c\\fR cancels those from FOO, \\fBqclone \\-p\\fR purges finished rows. The "
            "word after \\-s or \\-d is always a VDisk name."),
        "exit": EXIT_QCLONE,
        "files": FILES_CTL,
        "see_also": "vdiskfs(1); docs/SPEC.md in the vdiskfs source.",
    },
}

MACROS = {"TH", "SH", "SS", "TP", "PP", "IP", "RS", "RE", "B", "I", "BR", "IR", "nf",
          "fi", "br", "UR", "UE", "sp", "in", "ti"}


def tagged(items: list[tuple[str, str]]) -> str:
    return "\n".join(f".TP\n\\fB{tag}\\fR\n{text}" for tag, text in items)


def roff_safe(page: str) -> str:
    """argparse-manpage fills help text in as it is: a wrapped line that starts with "."
    or "'" (".ctl/vdisks") would be taken for a request and vanish. Guard such lines."""
    out = []
    for line in page.split("\n"):
        m = re.match(r"[.'](\S*)", line)
        if m and (line[0] == "'" or m.group(1) not in MACROS):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


def build(name: str, parser: argparse.ArgumentParser, version: str) -> str:
    from argparse_manpage.manpage import Manpage
    info = PAGES[name]
    for action in parser._actions:                           # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):   # noqa: SLF001
            for group in parser._action_groups:              # noqa: SLF001
                if action in group._group_actions:           # noqa: SLF001
                    group.title = "commands"                 # not "positional arguments"
    parser.description = None      # DESCRIPTION says more (the NAME line says as much)
    page = Manpage(parser, _data={"project_name": "vdiskfs", "version": version,
                                  "manual_title": "vdiskfs manual",
                                  "description": info["name"]})
    page.add_section("description", "=", info["description"])
    page.add_section("EXIT STATUS", "=", tagged(info["exit"]))
    page.add_section("ENVIRONMENT", "=", tagged(ENVIRONMENT))
    page.add_section("FILES", "=", tagged(info["files"]))
    page.add_section("SEE ALSO", "=", info["see_also"])
    return roff_safe(str(page))


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: manpages.py OUTDIR", file=sys.stderr)
        return 2
    try:
        import argparse_manpage.manpage  # noqa: F401
    except ImportError:
        print("manpages.py: argparse-manpage is not installed (pip install argparse-manpage)",
              file=sys.stderr)
        return 1
    from vdiskfs import __version__
    from vdiskfs.cli import build_parser, build_qclone_parser
    out = argv[0]
    try:
        os.makedirs(out, exist_ok=True)
        for name, parser in (("vdiskfs", build_parser()), ("qclone", build_qclone_parser())):
            path = os.path.join(out, f"{name}.1")
            with open(path + ".tmp", "w") as f:
                f.write(build(name, parser, __version__))
            os.replace(path + ".tmp", path)
            print(f"wrote {path}")
    except OSError as e:
        print(f"manpages.py: cannot write the man pages into {out}: {e.strerror}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
