"""The shell examples in README.md and docs/*.md run, so the docs cannot go stale.

A block fenced as ```bash test runs here with this venv's `gptctl` first on PATH, in a temporary
directory holding links to examples/ and the venv (`.venv`, for `source .venv/bin/activate`).
The blocks of one page run in order; the pages of a CHAIN run in one directory, so that later
pages use what earlier ones made (the README's walk-through trains `runs/tiny-qa/best`, which
serving.md then serves). What the harness adds, and nothing else:
- the README's "your corpus": `corpus/` and `qa.jsonl` from the demo's corpus writer;
- GPTCTL_MAX_STEPS=4, which examples/*.yaml read (`max_steps: ${GPTCTL_MAX_STEPS:-300}`);
- GPTCTL_PORT, a free port, which `gptctl deploy` and `generate`/`chat`/`curl` default to;
- a background job a block starts (`gptctl deploy … &`) gets SIGTERM when its block ends.

A block that cannot run here says why in its fence (```bash cluster): see NOT_RUN. Every
`gptctl …` line of those is still checked against the real parser, flags included.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infra.s3_endpoint import free_port
from orchestrator.cli import build_parser
from orchestrator.cli.help import subparsers

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)
# Ends what a block left running (``gptctl deploy ... &``) and keeps the block's own exit status:
# a bare ``kill`` with no jobs fails, and under ``set -e`` that failure would become the exit status.
END_BACKGROUND_JOBS = "trap 'rc=$?; kill $(jobs -p) 2>/dev/null || true; wait; exit $rc' EXIT\n"
BLOCK_TIMEOUT_S = 300
NOT_RUN = {
    "cluster": "needs machines of a real cluster (HEAD_IP), Kubernetes or the local stack's services",
    "aws": "needs an S3 endpoint or AWS account of the reader's",
    "slow": "takes minutes: the whole demo, a benchmark, a GPU",
}
CHAINS = [["README.md", "docs/serving.md", "docs/lora.md", "docs/training.md"]]


def shell_blocks(page: Path) -> list[tuple[str, str]]:
    """(how it is fenced: "test", a NOT_RUN reason or "", text) of every bash/sh block of a page."""
    blocks = []
    for match in FENCE.finditer(page.read_text()):
        words = match.group(1).split()
        if words and words[0] in ("bash", "sh", "shell", "console"):
            blocks.append((words[1] if len(words) > 1 else "", match.group(2)))
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
    """Why the real parser refuses `gptctl ARGS`: no such command, an unknown flag, a missing
    argument (None if it takes them)."""
    parser = build_parser()
    path = []
    while True:
        children = subparsers(parser)
        if not children:
            return _leaf_problem(parser, args, path)
        while args and args[0].startswith("-"):  # global options such as --s3-endpoint URL
            args = args[2:] if args[0] == "--s3-endpoint" else args[1:]
        if not args:  # `gptctl`, `gptctl --help`
            return None
        if args[0] not in children:
            return f"`gptctl {' '.join(path + [args[0]])}` is no command; expected one of: {', '.join(children)}"
        path.append(args[0])
        parser, args = children[args[0]], args[1:]


def _leaf_problem(parser, args: list[str], path: list[str]) -> str | None:
    import contextlib
    import io

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exit:
        if exit.code:
            return f"`gptctl {' '.join(path + args)}`: {errors.getvalue().strip().splitlines()[-1]}"
    return None


ALL_BLOCKS = [(page, fence, text) for page in PAGES for fence, text in shell_blocks(page)]
PAGES_WITH_TESTS = [page for page in PAGES if any(fence == "test" for fence, _ in shell_blocks(page))]
RUNS = [[ROOT / name for name in chain] for chain in CHAINS] + [
    [page] for page in PAGES_WITH_TESTS if str(page.relative_to(ROOT)) not in {n for c in CHAINS for n in c}]


def test_readme_stays_short():
    """Reference and tuning notes go to a docs/ page of their own (issue #19)."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 120


def test_docs_have_runnable_examples():
    assert (ROOT / "docs").is_dir() and len(PAGES_WITH_TESTS) >= 5, [p.name for p in PAGES_WITH_TESTS]


def test_every_block_runs_or_says_why_not():
    unexplained = [f"{page.relative_to(ROOT)}: ```bash {fence}".strip() + f"\n{text[:80]}"
                   for page, fence, text in ALL_BLOCKS if fence != "test" and fence not in NOT_RUN]
    assert not unexplained, "fence each block as ```bash test or with a reason of NOT_RUN:\n" + "\n".join(unexplained)


def test_extraction_reads_commands_the_way_bash_does():
    block = ('eval "$(gptctl stack env)"   # exports\ngptctl data prepare a b \\\n  --out c && gptctl nope\n'
             "cat > x.yaml <<'EOF'\ngptctl inside-a-heredoc\nEOF\n")
    assert gptctl_commands(block) == [["stack", "env"], ["data", "prepare", "a", "b", "--out", "c"], ["nope"]]
    assert command_problem(["nope"]) and "expected one of" in command_problem(["nope"])
    assert command_problem(["stack", "sideways"]) and command_problem(["--s3-endpoint", "u", "data", "prepare",
                                                                        "c", "--out", "d"]) is None
    assert "--checkpoint" in command_problem(["deploy", "--checkpoint", "x"])
    assert "required" in command_problem(["data", "prepare", "corpus/"])


@pytest.mark.parametrize("page,block", [(p, t) for p, _, t in ALL_BLOCKS],
                         ids=[f"{p.relative_to(ROOT)}#{i}" for i, (p, _, _) in enumerate(ALL_BLOCKS)])
def test_every_gptctl_line_names_a_real_command(page, block):
    problems = [problem for args in gptctl_commands(block) if (problem := command_problem(args))]
    assert not problems, f"{page.relative_to(ROOT)}: " + "; ".join(problems)


def _your_corpus(directory: Path) -> None:
    """What the README's walk-through starts from: a folder of text files and a prompt/response file."""
    from orchestrator.data.corpus import write_demo_corpus

    made = write_demo_corpus(directory / ".corpus-source", n_people=60, seed=0)
    shutil.copytree(made["pretrain"], directory / "corpus")
    shutil.copyfile(made["qa_train"], directory / "qa.jsonl")


@pytest.mark.integration
@pytest.mark.parametrize("pages", RUNS, ids=lambda pages: "+".join(str(p.relative_to(ROOT)) for p in pages))
def test_marked_examples_run(pages, tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    if pages[0].name == "README.md":
        _your_corpus(tmp_path)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("AWS_", "MLFLOW_", "RAY_", "GPTCTL_"))}  # the page's example, not this shell's set-up
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false",
               GPTCTL_MAX_STEPS="4", GPTCTL_PORT=str(free_port()))
    for page in pages:
        for fence, block in shell_blocks(page):
            if fence != "test":
                continue
            script = END_BACKGROUND_JOBS + block
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
            assert done.returncode == 0, (f"{page.relative_to(ROOT)}: this example failed (exit {done.returncode}):\n"
                                          f"{block}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
