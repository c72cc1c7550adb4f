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
MANPAGES = os.path.join(ROOT, "scripts", "manpages.py")


def docs(root: str = ROOT) -> list[str]:
    """README.md and docs/*.md under ``root``."""
    d = os.path.join(root, "docs")
    return [os.path.join(root, "README.md")] + sorted(
        os.path.join(d, n) for n in os.listdir(d) if n.endswith(".md"))


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
def render(page: str) -> str | None:
    """The page as text, with groff's or man's warnings; None if neither is installed."""
    if shutil.which("groff"):
        proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", page],
                              capture_output=True, text=True)
        assert proc.returncode == 0 and not proc.stderr, f"groff on {page}: {proc.stderr}"
        proc = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou", page],
                              capture_output=True, text=True, check=True)
        return proc.stdout
    if shutil.which("man"):
        proc = subprocess.run(["man", "--warnings", "-l", page], capture_output=True,
                              text=True, env=dict(os.environ, MANWIDTH="200", MAN_KEEP_FORMATTING=""))
        assert proc.returncode == 0 and not proc.stderr, f"man -l {page}: {proc.stderr}"
        return re.sub(r".\x08", "", proc.stdout)
    return None


def test_man_pages_name_every_command_and_option(tmp_path):
    try:
        import argparse_manpage  # noqa: F401
    except ImportError:
        pytest.fail("argparse-manpage is not installed: bash scripts/setup.sh deps installs "
                    "it (pyproject.toml's docs extra)")
    proc = subprocess.run([sys.executable, MANPAGES, str(tmp_path)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    for name, parser in parsers().items():
        path = tmp_path / f"{name}.1"
        page = path.read_text()
        plain = page.replace("\\-", "-")
        for cmd in subcommands(parser):
            assert f"'{name} {cmd}'" in plain, f"{name}.1 lacks the command {cmd}"
        for opt in long_options(parser) - {"--help"}:     # the generator shows -h only
            assert re.search(rf"{re.escape(opt)}(?![\w-])", plain), f"{name}.1 lacks {opt}"
        for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "EXIT STATUS", "ENVIRONMENT",
                        "FILES", "SEE ALSO"):
            assert f".SH {heading}" in page, f"{name}.1 lacks {heading}"
        text = render(str(path))
        if text is not None:
            assert "%%" not in text, f"{name}.1 shows a printf escape %%: " + next(
                line.strip() for line in text.splitlines() if "%%" in line)
            for cmd in subcommands(parser):
                assert f"{name} {cmd}" in text, f"{name}.1 renders without {cmd}"


def test_man_page_generator_without_argparse_manpage_says_so(tmp_path):
    """scripts/setup.sh relies on this interface: one line on stderr, non-zero, no pages."""
    stub = tmp_path / "stub" / "argparse_manpage"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, MANPAGES, str(out)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(stub.parent)))
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "argparse-manpage" in proc.stderr, \
        proc.stderr
    assert not out.exists() or not os.listdir(out)


# ---------------------------------------------------------------- links
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")
# A path-like mention: dir/…/name.ext or a bare name.ext, for the kinds of files a
# repository holds (not .json: results and placeholders such as NEW.json).
MENTION = re.compile(r"(?<![\w/.@$-])((?:\.\./)*(?:[\w@-][\w.@-]*/)*[\w@-][\w.@-]*"
                     r"\.(?:md|py|sh|service|toml|cfg|ini))(?![\w/-])")
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "node_modules", "results"}


def repo_files(root: str) -> list[str]:
    """Paths (relative to ``root``) of the files of the tree, not descending into hidden
    or generated directories nor into mount points (a live FUSE mount in ./mnt)."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.startswith(".")
                   and not os.path.ismount(os.path.join(d, x))]
        out += [os.path.relpath(os.path.join(d, f), root) for f in files]
    return out


def broken_references(path: str, root: str = ROOT, files: list[str] | None = None) -> list[str]:
    """Links and path-like mentions in ``path`` that are not files inside ``root``. A link
    resolves from the doc's folder; a mention may also name a file by a tail of its path
    (`cow/pool.py`, `t1_thin.py`), as the docs do."""
    root = os.path.abspath(root)
    files = repo_files(root) if files is None else files
    text = open(path).read()
    base = os.path.dirname(os.path.abspath(path))

    def inside(target: str) -> bool:
        full = os.path.normpath(os.path.join(base, target))
        return full.startswith(root + os.sep) and os.path.exists(full)

    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):                      # http:, mailto:, man:
            continue
        if not inside(target):
            bad.append(f"link {target}")
    for mention in set(MENTION.findall(text)):
        if "/" not in mention and mention.endswith(".service"):
            continue                          # a systemd unit's name (vdiskfs@main.service)
        if mention.startswith("../"):
            ok = inside(mention)              # out of the doc's folder: must resolve
        else:
            ok = inside(mention) or os.path.exists(os.path.join(root, mention)) or any(
                f == mention or f.endswith(os.sep + mention) for f in files)
        if not ok:
            bad.append(f"mention {mention}")
    return sorted(bad)


def test_docs_point_only_at_files_in_the_repository():
    files = repo_files(ROOT)
    problems = {os.path.relpath(p, ROOT): broken_references(p, files=files) for p in docs()}
    assert not any(problems.values()), {k: v for k, v in problems.items() if v}


def test_a_reference_outside_the_repository_is_caught(tmp_path):
    """The check can fail: bad references in a scratch copy of the docs are found."""
    copy = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "docs"), copy / "docs")
    shutil.copy(os.path.join(ROOT, "README.md"), copy / "README.md")
    for name in ("scripts", "tests", "vdiskfs", "bench", "contrib"):
        if os.path.isdir(os.path.join(ROOT, name)):
            shutil.copytree(os.path.join(ROOT, name), copy / name,
                            ignore=shutil.ignore_patterns("__pycache__", "results"))
    for f in ("pyproject.toml", "Makefile"):
        if os.path.exists(os.path.join(ROOT, f)):
            shutil.copy(os.path.join(ROOT, f), copy / f)
    readme = str(copy / "README.md")
    before = broken_references(readme, str(copy))     # the copy sees what the tree has
    assert before == broken_references(os.path.join(ROOT, "README.md"))
    with open(readme, "a") as f:
        f.write("\nThe contract is ../shared/SPEC.md, see [x](../elsewhere.md), "
                "[y](docs/NOPE.md) and DESIGN.md; [z](docs/FORMAT.md) is fine.\n")
    found = sorted(set(broken_references(readme, str(copy))) - set(before))
    assert found == ["link ../elsewhere.md", "link docs/NOPE.md", "mention ../elsewhere.md",
                     "mention ../shared/SPEC.md", "mention DESIGN.md",
                     "mention docs/NOPE.md"], found


# ---------------------------------------------------------------- SPEC coverage
def test_spec_names_every_command_and_ctl_file():
    from vdiskfs.fs.operations import CTL_FILES
    spec = open(os.path.join(ROOT, "docs", "SPEC.md")).read()
    for cmd in subcommands(parsers()["vdiskfs"]):
        assert re.search(rf"\bvdiskfs {cmd}\b", spec), \
            f"docs/SPEC.md never mentions `vdiskfs {cmd}`"
    for name in (n.decode() for n in CTL_FILES):
        assert f".ctl/{name}" in spec or f"| `{name}` |" in spec, \
            f"docs/SPEC.md never describes .ctl/{name}"
