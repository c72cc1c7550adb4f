"""The project's docs follow its code (issue 13): the man pages generated from the argparse
parsers name every command and option, every file a doc points at is in the repository,
and docs/SPEC.md names every subcommand and every ``.ctl/`` file."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(
    os.path.join(ROOT, "docs", n) for n in os.listdir(os.path.join(ROOT, "docs"))
    if n.endswith(".md"))


def parsers() -> dict[str, argparse.ArgumentParser]:
    from vdiskfs.cli import build_parser, build_qclone_parser
    return {"vdiskfs": build_parser(), "qclone": build_qclone_parser()}


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every visible --option of a parser and of its subcommands."""
    out = set()
    for action in parser._actions:                            # noqa: SLF001
        if action.help == argparse.SUPPRESS:
            continue
        out |= {o for o in action.option_strings if o.startswith("--")}
        if isinstance(action, argparse._SubParsersAction):    # noqa: SLF001
            for sub in action.choices.values():
                out |= long_options(sub)
    return out


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    return [name for a in parser._actions                     # noqa: SLF001
            if isinstance(a, argparse._SubParsersAction) for name in a.choices]  # noqa: SLF001


# ---------------------------------------------------------------- man pages
def test_man_pages_name_every_command_and_option(tmp_path):
    try:
        import argparse_manpage  # noqa: F401
    except ImportError:
        pytest.fail("argparse-manpage is not installed: bash scripts/setup.sh deps installs "
                    "it (pyproject.toml's docs extra)")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "manpages.py"),
                    str(tmp_path)], check=True, capture_output=True)
    for name, parser in parsers().items():
        page = (tmp_path / f"{name}.1").read_text()
        plain = page.replace("\\-", "-")
        for cmd in subcommands(parser):
            assert f"'{name} {cmd}'" in plain, f"{name}.1 lacks the command {cmd}"
        for opt in long_options(parser) - {"--help"}:     # the generator shows -h only
            assert opt in plain, f"{name}.1 lacks {opt}"
        for heading in ("NAME", "SYNOPSIS", "EXIT STATUS", "SEE ALSO"):
            assert f".SH {heading}" in page, f"{name}.1 lacks {heading}"
        if shutil.which("groff"):
            proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z",
                                   str(tmp_path / f"{name}.1")], capture_output=True, text=True)
            assert proc.returncode == 0 and not proc.stderr, proc.stderr


# ---------------------------------------------------------------- links
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")
MENTION = re.compile(r"(?<![\w/.-])((?:\.\./|docs/|scripts/|contrib/|bench/|tests/)[\w./@-]+"
                     r"\.(?:md|py|sh|service|toml))\b")


def broken_references(path: str) -> list[str]:
    """Links and path-like mentions in ``path`` that are not files of the repository."""
    text = open(path).read()
    base = os.path.dirname(path)
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):                      # http:, mailto:, man:
            continue
        full = os.path.normpath(os.path.join(base, target))
        if not full.startswith(ROOT + os.sep) or not os.path.exists(full):
            bad.append(f"link {target}")
    for mention in MENTION.findall(text):
        candidates = [os.path.normpath(os.path.join(d, mention)) for d in (base, ROOT)]
        if not any(c.startswith(ROOT + os.sep) and os.path.exists(c) for c in candidates):
            bad.append(f"mention {mention}")
    return bad


def test_docs_point_only_at_files_in_the_repository():
    problems = {os.path.relpath(p, ROOT): broken_references(p) for p in DOCS}
    assert not any(problems.values()), {k: v for k, v in problems.items() if v}


def test_a_reference_outside_the_repository_is_caught(tmp_path):
    # The check itself can fail: a doc beside README pointing out of the tree.
    bad = os.path.join(ROOT, "docs", "_t1_docs_probe.md")
    try:
        with open(bad, "w") as f:
            f.write("See ../shared/SPEC.md and [x](../../elsewhere.md) and [y](FORMAT.md).\n")
        found = broken_references(bad)
        assert "link ../../elsewhere.md" in found and "mention ../shared/SPEC.md" in found
        assert not [f for f in found if "FORMAT.md" in f], found
    finally:
        os.unlink(bad)


# ---------------------------------------------------------------- SPEC coverage
def test_spec_names_every_command_and_ctl_file():
    from vdiskfs.fs.operations import CTL_FILES
    spec = open(os.path.join(ROOT, "docs", "SPEC.md")).read()
    for cmd in subcommands(parsers()["vdiskfs"]):
        assert f"vdiskfs {cmd}" in spec, f"docs/SPEC.md never mentions `vdiskfs {cmd}`"
    for name in CTL_FILES:
        assert f"`{name.decode()}`" in spec or f".ctl/{name.decode()}" in spec, \
            f"docs/SPEC.md never describes .ctl/{name.decode()}"
