"""The grammar of ``.ctl/clone`` (SPEC §4): one command per write.

    SRC DST        | -s SRC -d DST     start cloning SRC to a new VDisk DST
    cancel SRC     | -s SRC -c         cancel the clones in progress from SRC
    purge          | -p                clear the rows of finished operations

Words are separated by spaces or tabs. A first word ``cancel`` or ``purge`` is always the
keyword, so a VDisk literally named so is cloned with the ``-s``/``-d`` spelling; the word
after ``-s`` or ``-d`` is always a VDisk name, even one that starts with ``-``. Anything
else (extra words, a flag given twice, more than one line, other control characters,
non-ASCII, unknown flags) is EINVAL.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from ..cow import names
from ..cow.errors import VDiskError

MAX_COMMAND = 4096
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")   # any control character but tab


@dataclass(frozen=True)
class Command:
    action: str            # "start", "cancel" or "purge"
    src: str | None = None
    dst: str | None = None


def _bad(why: str) -> VDiskError:
    return VDiskError(errno.EINVAL, why)


def parse(data: bytes) -> Command:
    if len(data) > MAX_COMMAND:
        raise _bad("command too long")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise _bad("command is not ASCII") from None
    if text.endswith("\n"):
        text = text[:-1]
    if "\n" in text:
        raise _bad("one command per write")
    if _CONTROL.search(text):
        raise _bad("control character in command")
    words = text.replace("\t", " ").split(" ")
    words = [w for w in words if w]
    if not words:
        raise _bad("empty command")
    if words[0].startswith("-"):
        cmd = _parse_flags(words)
    elif words[0] == "purge":
        if len(words) != 1:
            raise _bad("purge takes no arguments")
        cmd = Command("purge")
    elif words[0] == "cancel":
        if len(words) != 2:
            raise _bad("use: cancel SRC")
        cmd = Command("cancel", src=words[1])
    elif len(words) == 2:
        cmd = Command("start", src=words[0], dst=words[1])
    else:
        raise _bad(f"unknown command {text!r}")
    for name in (cmd.src, cmd.dst):
        if name is not None:
            names.check(name)
    return cmd


def _parse_flags(words: list[str]) -> Command:
    src = dst = None
    cancel = purge = False
    it = iter(words)
    for w in it:
        if w in ("-s", "-d"):
            value = next(it, None)    # always a name, "-s" included
            if value is None:
                raise _bad(f"{w} needs a VDisk name")
            if (src if w == "-s" else dst) is not None:
                raise _bad(f"{w} given twice")
            if w == "-s":
                src = value
            else:
                dst = value
        elif w == "-c" and not cancel:
            cancel = True
        elif w == "-p" and not purge:
            purge = True
        elif w in ("-c", "-p"):
            raise _bad(f"{w} given twice")
        else:
            raise _bad(f"unknown flag {w!r}")
    if purge and not (cancel or src or dst):
        return Command("purge")
    if cancel and src and not (dst or purge):
        return Command("cancel", src=src)
    if src and dst and not (cancel or purge):
        return Command("start", src=src, dst=dst)
    raise _bad("use -s SRC -d DST, -s SRC -c or -p")
