"""The docs' commands exist: every `unilip ...` line in the code blocks of README.md and
docs/*.md parses with the real command line, and every option a synopsis names is in that
command's --help; every doc the README links to exists, and the README stays a front page."""

import argparse
import re
import shlex

import pytest

from cli import build_parser
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
DOCS = [README] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]


def code_lines(text: str) -> list[str]:
    """Lines inside ``` fences, comments cut."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line.split(" #")[0].strip())
    return lines


LINES = [line for text in DOCS for line in code_lines(text)]
COMMANDS = [line for line in LINES if line.startswith("unilip ")]
CONCRETE = [c for c in COMMANDS if not re.search(r"[\[|]|\.\.\.", c)]  # synopsis lines have [opt] and a|b
SYNOPSIS = [c for c in COMMANDS if c not in CONCRETE]


def subcommand_help(words: list[str]) -> str:
    """--help of the (sub)command the words name, e.g. ["data", "sample", ...]."""
    parser = build_parser()
    for word in words:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers or word not in subparsers[0].choices:
            break
        parser = subparsers[0].choices[word]
    return parser.format_help()


def test_readme_shows_the_cluster_and_demo_commands():
    for needed in ("unilip submit", "unilip jobs list", "unilip jobs logs", "unilip plan", "unilip demo"):
        assert any(c.startswith(needed) for c in COMMANDS), needed
    assert len(CONCRETE) >= 15 and len(SYNOPSIS) >= 15  # the fences were found


@pytest.mark.parametrize("command", CONCRETE)
def test_every_concrete_readme_command_parses(command):
    argv = shlex.split(command.replace("$", ""))[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code != 0:  # --help exits 0
            pytest.fail(f"README command does not parse ({e.code}): {command}")


@pytest.mark.parametrize("synopsis", SYNOPSIS)
def test_every_option_in_the_synopsis_is_in_the_help(synopsis):
    words = synopsis.split()[1:]
    help_text = subcommand_help(words)
    for flag in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", synopsis))):
        assert flag in help_text, f"{flag} of `{synopsis}` is not in its --help"


def test_the_readme_is_a_front_page_whose_links_resolve():
    import re

    assert len(README.splitlines()) < 200
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert "docs/layout.md" in links and all((ROOT / link).exists() for link in links), links
