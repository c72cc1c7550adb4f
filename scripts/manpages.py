"""Write the man pages vdiskfs.1 and qclone.1 into OUTDIR, generated from the argparse
parsers (vdiskfs.cli) by argparse-manpage, so they never drift from ``--help``.

    python scripts/manpages.py OUTDIR        (scripts/setup.sh: /usr/local/share/man/man1)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXTRA = {
    "vdiskfs": {
        "description": "virtual disks with instant copy-on-write clones, as files in a "
                       "FUSE mount",
        "sections": [
            ("EXIT STATUS", "0 on success; otherwise non-zero with one line on stderr. "
             "fsck exits as e2fsck: 0 clean, 1 errors corrected, 4 errors left uncorrected, "
             "8 could not check. scrub exits 1 when it found damaged blocks."),
            ("FILES", "MNT/.ctl/clone (commands), MNT/.ctl/status and MNT/.ctl/jobs (clone "
             "jobs), MNT/.ctl/scrub, MNT/.ctl/vdisks (the listing as JSON); POOL/daemon.log "
             "(the daemon's log); POOL/lock (the daemon's pid while mounted)."),
            ("SEE ALSO", "qclone(1), mount.fuse3(8), fstab(5); docs/SPEC.md and "
             "docs/MOUNTING.md in the vdiskfs source."),
        ],
    },
    "qclone": {
        "description": "start, list and cancel clones of VDisks in a vdiskfs mount "
                       "(QUADStor's qclone flags)",
        "sections": [
            ("EXIT STATUS", "0 on success; 1 with one line on stderr otherwise (with -w: "
             "also when the clone ends Cancelled or Error)."),
            ("SEE ALSO", "vdiskfs(1)"),
        ],
    },
}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: manpages.py OUTDIR", file=sys.stderr)
        return 2
    try:
        from argparse_manpage.manpage import Manpage
    except ImportError:
        print("manpages.py: argparse-manpage is not installed (pip install argparse-manpage)",
              file=sys.stderr)
        return 1
    from vdiskfs import __version__
    from vdiskfs.cli import build_parser, build_qclone_parser
    out = argv[0]
    os.makedirs(out, exist_ok=True)
    for name, parser in (("vdiskfs", build_parser()), ("qclone", build_qclone_parser())):
        extra = EXTRA[name]
        page = Manpage(parser, _data={"project_name": "vdiskfs", "version": __version__,
                                      "manual_title": "vdiskfs manual",
                                      "description": extra["description"]})
        for heading, text in extra["sections"]:
            page.add_section(heading, ">", text)
        path = os.path.join(out, f"{name}.1")
        with open(path + ".tmp", "w") as f:
            f.write(str(page))
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
