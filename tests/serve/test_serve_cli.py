"""`gptctl chat` and the deploy flags from orchestrator/cli/serve.py."""
from __future__ import annotations

import argparse
import io
import json

import pytest

from orchestrator.cli import serve as cli_serve
from orchestrator.spec import DeploySpec


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptctl")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_serve.register(sub)
    deploy = sub.add_parser("deploy")
    deploy.add_argument("target")
    cli_serve.add_deploy_flags(deploy)
    return parser


def test_deploy_flags_become_spec_fields():
    args = _parser().parse_args(["deploy", "ckpt", "--max-replicas", "3", "--api-key-env", "KEY", "--gpus", "1",
                                 "--max-context", "256", "--route-prefix", "/m"])
    fields = cli_serve.deploy_spec_fields(args)
    assert fields == {"max_replicas": 3, "api_key_env": "KEY", "gpus_per_replica": 1.0, "max_context": 256,
                      "route_prefix": "/m"}
    spec = DeploySpec(kind="deploy", checkpoint="ckpt", **fields)
    assert spec.max_replicas == 3 and spec.num_replicas == 1


@pytest.mark.integration
def test_chat_streams_and_prints_json(serve_url, capsys, monkeypatch):
    args = _parser().parse_args(["chat", "Where does Alice live?", "--url", serve_url, "--max-tokens", "6",
                                 "--temperature", "0"])
    assert args.handler(args) == 0
    streamed = capsys.readouterr().out
    args = _parser().parse_args(["chat", "Where does Alice live?", "--url", serve_url, "--max-tokens", "6",
                                 "--temperature", "0", "--json"])
    assert args.handler(args) == 0
    reply = json.loads(capsys.readouterr().out)
    assert streamed == reply["choices"][0]["message"]["content"] + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\n\nsecond question\n"))
    args = _parser().parse_args(["chat", "--url", serve_url, "--max-tokens", "3", "--no-stream"])
    assert args.handler(args) == 0
    assert capsys.readouterr().out.count("\n") >= 2
