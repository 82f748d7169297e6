"""What `gptctl --help`, each subcommand's `--help` and a bare `gptctl` show besides argparse's
usage: an example line per command, and the quick start.

The examples live in one table rather than beside each `add_parser` call, so a feature module
that registers commands (orchestrator/cli/__init__.py) needs no help plumbing; a parser may also set
its own `epilog`. tests/orchestrator/test_cli_help.py walks every subcommand and fails on one
without an example.
"""
from __future__ import annotations

import argparse

QUICK_START = """\
gptctl: train, fine-tune and serve a GPT on Ray (tokenize -> DeepSpeed ZeRO workers -> MLflow -> Ray Serve).

Quick start, all local, no network:
  gptctl demo                                   # prepare -> pre-train -> fine-tune -> deploy -> generate

From your corpus to an endpoint:
  gptctl data prepare corpus/ --out shards/pretrain --vocab-size 4096 --seq-len 128
  GPTCTL_DATA=shards/pretrain GPTCTL_STORAGE=runs gptctl submit examples/pretrain.yaml
  gptctl deploy runs/tiny-pretrain/best         # Ctrl-C stops it
  gptctl generate "Once upon a time" --raw      # from another shell

`gptctl COMMAND --help` shows each command's options and an example; README.md and docs/ the rest.
"""

# "command" or "command subcommand" -> example lines shown under its --help
EXAMPLES: dict[str, str] = {
    "data": "gptctl data prepare corpus/ --out shards/pretrain --vocab-size 4096 --seq-len 128",
    "data prepare": "gptctl data prepare corpus/ --out s3://my-bucket/shards/pretrain --vocab-size 8192\n"
                    "gptctl data prepare qa.jsonl --tokenizer shards/pretrain/tokenizer.json --out shards/qa",
    "validate": "gptctl validate examples/pretrain.yaml --print",
    "submit": "gptctl submit examples/pretrain.yaml\n"
              "gptctl submit examples/pipeline.yaml --address http://HEAD:8265 --wait",
    "deploy": "gptctl deploy runs/tiny-qa/best --port 8000\n"
              "gptctl deploy models:/tiny-qa@best --api-key-env GPTCTL_API_KEY",
    "generate": 'gptctl generate "Where does Alice live?" --url http://127.0.0.1:8000',
    "chat": 'gptctl chat "Where does Alice live?"',
    "demo": "gptctl demo --workdir demo_output",
    "export": "gptctl export runs/tiny-qa/best --format hf --out tiny-qa-hf",
    "models": "gptctl models list --name tiny-qa",
    "models list": "gptctl models list --name tiny-qa --json",
    "models get": "gptctl models get models:/tiny-qa@best --out tiny-qa",
    "schema": "gptctl schema --kind pretrain > pretrain.schema.json",
    "resolve": "gptctl resolve examples/pipeline.yaml",
    "status": "gptctl status raysubmit_XYZ --address http://HEAD:8265 --wait",
    "logs": "gptctl logs raysubmit_XYZ --address http://HEAD:8265 --follow",
    "stop": "gptctl stop raysubmit_XYZ --address http://HEAD:8265",
    "list": "gptctl list --address http://HEAD:8265",
    "report": "gptctl report tiny-pretrain --out tiny-pretrain.png",
    "stack": 'gptctl stack up && eval "$(gptctl stack env)"',
    "stack up": "gptctl stack up --s3 moto",
    "stack down": "gptctl stack down",
    "stack status": "gptctl stack status --json",
    "stack env": 'eval "$(gptctl stack env)"',
}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that text with line breaks (examples) is kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's direct subcommands by name (aliases left out)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                if child not in found.values():
                    found[name] = child
    return found


def walk(parser: argparse.ArgumentParser, path: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    """(command path, parser) of a parser and every subcommand below it."""
    found = [(path, parser)]
    for name, child in subparsers(parser).items():
        found += walk(child, f"{path} {name}".strip())
    return found


def add_examples(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every parser below `parser` its example epilog (unless it set its own) and the formatter."""
    for path, child in walk(parser):
        child.formatter_class = HelpFormatter
        if not child.epilog and path in EXAMPLES:
            child.epilog = "example:\n" + "\n".join(f"  {line}" for line in EXAMPLES[path].splitlines())
    if not parser.epilog:
        parser.epilog = QUICK_START.split("\n\n", 1)[1]  # the quick start without its title line
    return parser
