"""The shell examples in README.md and docs/*.md run, so the docs cannot go stale.

A block fenced as ```bash test runs here: the blocks of one page in order, in one temporary
directory holding a link to examples/, with this venv's `gptctl` first on PATH. Keep such blocks
cheap and offline (validate, resolve, schema, data prepare on a tiny corpus, --help). Blocks
that need AWS, Kubernetes or a long-running service stay plain ```bash; every `gptctl …` line
in those is still checked against the real parser, so a renamed command fails here too.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import build_parser
from orchestrator.cli.help import subparsers

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)
BLOCK_TIMEOUT_S = 60


def shell_blocks(page: Path) -> list[tuple[bool, str]]:
    """(marked to run, text) of every fenced bash/sh block of a page."""
    blocks = []
    for match in FENCE.finditer(page.read_text()):
        words = match.group(1).split()
        if words and words[0] in ("bash", "sh", "shell", "console"):
            blocks.append(("test" in words[1:], match.group(2)))
    return blocks


def gptctl_commands(block: str) -> list[list[str]]:
    """The arguments of every `gptctl` invocation in a block (comments and heredoc bodies aside)."""
    text = re.sub(r"<<-?\s*'?(\w+)'?.*?^\1$", "", block, flags=re.S | re.M)  # heredoc bodies
    text = text.replace("\\\n", " ")
    commands = []
    lines = []
    for line in text.splitlines():  # $(gptctl stack env) is a command of its own
        lines += [re.sub(r"\$\(([^)]*)\)", "X", line), *re.findall(r"\$\(([^)]*)\)", line)]
    for line in lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            words = line.split()
        for index, word in enumerate(words):
            if word == "gptctl":
                rest = []
                for arg in words[index + 1:]:
                    if arg in (";", "&&", "||", "|", ">", "&"):
                        break
                    rest.append(arg.rstrip(";"))
                    if arg.endswith(";"):
                        break
                commands.append(rest)
    return commands


def command_problem(args: list[str]) -> str | None:
    """Why `gptctl ARGS` names no command of the real parser (None if it does)."""
    parser = build_parser()
    path = []
    while True:
        children = subparsers(parser)
        if not children:
            return None
        while args and args[0].startswith("-"):  # global options such as --s3-endpoint URL
            args = args[2:] if args[0] == "--s3-endpoint" else args[1:]
        if not args:  # `gptctl`, `gptctl --help`
            return None
        if args[0] not in children:
            return f"`gptctl {' '.join(path + [args[0]])}` is no command; expected one of: {', '.join(children)}"
        path.append(args[0])
        parser, args = children[args[0]], args[1:]


ALL_BLOCKS = [(page, marked, text) for page in PAGES for marked, text in shell_blocks(page)]
PAGES_WITH_TESTS = [page for page in PAGES if any(marked for marked, _ in shell_blocks(page))]


def test_readme_stays_short():
    """Reference and tuning notes go to a docs/ page of their own (issue #19)."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 120


def test_docs_have_runnable_examples():
    assert (ROOT / "docs").is_dir() and len(PAGES_WITH_TESTS) >= 5, [p.name for p in PAGES_WITH_TESTS]


def test_extraction_reads_commands_the_way_bash_does():
    block = ('eval "$(gptctl stack env)"   # exports\ngptctl data prepare a b \\\n  --out c && gptctl nope\n'
             "cat > x.yaml <<'EOF'\ngptctl inside-a-heredoc\nEOF\n")
    assert gptctl_commands(block) == [["stack", "env"], ["data", "prepare", "a", "b", "--out", "c"], ["nope"]]
    assert command_problem(["nope"]) and "expected one of" in command_problem(["nope"])
    assert command_problem(["stack", "sideways"]) and command_problem(["--s3-endpoint", "u", "data", "prepare"]) is None


@pytest.mark.parametrize("page,block", [(p, t) for p, _, t in ALL_BLOCKS],
                         ids=[f"{p.relative_to(ROOT)}#{i}" for i, (p, _, _) in enumerate(ALL_BLOCKS)])
def test_every_gptctl_line_names_a_real_command(page, block):
    problems = [problem for args in gptctl_commands(block) if (problem := command_problem(args))]
    assert not problems, f"{page.relative_to(ROOT)}: " + "; ".join(problems)


@pytest.mark.parametrize("page", PAGES_WITH_TESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_marked_examples_run(page, tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("AWS_", "MLFLOW_", "RAY_", "GPTCTL_"))}  # the page's example, not this shell's set-up
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    for marked, block in shell_blocks(page):
        if not marked:
            continue
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        assert done.returncode == 0, (f"{page.relative_to(ROOT)}: this example failed (exit {done.returncode}):\n"
                                      f"{block}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
