"""Every command's --help ends with an example of itself; a bare `gptctl` prints the quick start."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import EXIT_OK, build_parser, main
from orchestrator.cli.help import QUICK_START, walk

COMMANDS = [path for path, _ in walk(build_parser())]


def test_the_walk_finds_nested_and_feature_commands():
    # commands registered by feature modules and nested ones are found without being listed
    assert len(COMMANDS) > 20 and {"", "data prepare", "submit", "stack up", "models list", "chat"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "gptctl")
def test_help_shows_an_example_of_the_command(command, capsys):
    parser = dict(walk(build_parser()))[command]
    needle = re.compile(re.escape(f"gptctl {command}".rstrip()) + r"(?![\w-])")  # `gptctl stack` is not `gptctl stackx`
    examples = [line.strip() for line in (parser.epilog or "").splitlines() if needle.search(line)]
    assert examples, (f"`gptctl {command} --help` shows no example line `gptctl {command} …`; add one to "
                      f"orchestrator/cli/help.py EXAMPLES (or give the parser an epilog)")
    with pytest.raises(SystemExit) as done:
        main([*command.split(), "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(f"{line}\n" in out for line in examples), "the example lines are shown as written"


def test_bare_gptctl_prints_the_quick_start(capsys):
    assert main([]) == EXIT_OK
    assert capsys.readouterr().out == QUICK_START


def test_the_console_script_without_arguments():
    gptctl = shutil.which("gptctl", path=str(Path(sys.executable).parent))
    assert gptctl, "the gptctl console script is installed"
    done = subprocess.run([gptctl], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Quick start" in done.stdout and "gptctl demo" in done.stdout
