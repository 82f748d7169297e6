"""Serving subcommands for `gptctl` (registered in orchestrator/cli/__init__.py).

    gptctl chat "Where does Alice live?" [--url URL] [--no-stream] [--json] ...
    gptctl chat                     # one question per line from stdin, until EOF

`chat` talks to POST /v1/chat/completions. The model was fine-tuned on single-turn prompts, so
every line is its own conversation (see orchestrator/serve/protocol.py: render_chat). The API
key, if the deployment has one, is read from $GPTCTL_API_KEY (or the variable --api-key-env
names). `add_deploy_flags`/`deploy_spec_fields` give the `deploy` command the serving options.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_OK = 0


def register(subparsers: argparse._SubParsersAction) -> None:
    chat = subparsers.add_parser("chat", help="chat with a deployed model (OpenAI /v1/chat/completions)")
    chat.add_argument("message", nargs="?", help="the question; without it, read one question per line from stdin")
    chat.add_argument("--url", default=default_url(), help="the app's base URL with its route prefix (default "
                      "$GPTCTL_URL, else http://127.0.0.1:$GPTCTL_PORT, else port 8000)")
    chat.add_argument("--model", help="model id (default: whatever the server serves)")
    add_sampling_flags(chat, max_tokens=128)
    chat.add_argument("--stop", action="append", help="stop string (repeatable, up to 4)")
    chat.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    chat.add_argument("--json", action="store_true", help="print the whole response object (implies --no-stream)")
    chat.add_argument("--api-key-env", default="GPTCTL_API_KEY", help="environment variable holding the API key")
    add_wait_flag(chat)
    chat.set_defaults(handler=_cmd_chat)


def _cmd_chat(args: argparse.Namespace) -> int:
    from orchestrator.serve.deploy import openai_request, openai_stream, wait_healthy

    if args.wait:
        wait_healthy(args.url, args.wait)
    key = os.environ.get(args.api_key_env) or None
    params = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
              "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed, "stop": args.stop}
    params = {k: v for k, v in params.items() if v is not None}
    questions = [args.message] if args.message is not None else (line.rstrip("\n") for line in sys.stdin)
    for question in questions:
        if not question.strip():
            continue
        body = {"messages": [{"role": "user", "content": question}], **params}
        if args.json or args.no_stream:
            reply = openai_request(args.url, "/v1/chat/completions", body, api_key=key)
            print(json.dumps(reply, indent=2) if args.json else reply["choices"][0]["message"]["content"], flush=True)
            continue
        for event in openai_stream(args.url, "/v1/chat/completions", body, api_key=key):
            for choice in event["choices"]:
                print(choice["delta"].get("content", ""), end="", flush=True)
        print(flush=True)
    return EXIT_OK


def add_sampling_flags(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """The sampling flags `generate` and `chat` share."""
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)


def default_url() -> str:
    """Where `generate`/`chat` go by default: $GPTCTL_URL, else the port `gptctl deploy` defaults to."""
    return os.environ.get("GPTCTL_URL") or f"http://127.0.0.1:{os.environ.get('GPTCTL_PORT', '8000')}"


def add_wait_flag(parser: argparse.ArgumentParser) -> None:
    """--wait: a script that has just started `gptctl deploy … &` waits for the endpoint, not a retry loop."""
    parser.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="first wait up to this long for the endpoint's /healthz (default: no wait)")


def add_deploy_flags(parser: argparse.ArgumentParser) -> None:
    """Serving options for `gptctl deploy CHECKPOINT` (a deploy spec file sets the same fields)."""
    group = parser.add_argument_group("serving")
    group.add_argument("--route-prefix", help="URL prefix of the app (default /)")
    group.add_argument("--cpus", type=float, dest="cpus_per_replica", help="CPUs per replica (default 1)")
    group.add_argument("--gpus", type=float, dest="gpus_per_replica", help="GPUs per replica (default 0)")
    group.add_argument("--min-replicas", type=int, help="autoscaling lower bound (with --max-replicas)")
    group.add_argument("--max-replicas", type=int, help="autoscale up to this many replicas")
    group.add_argument("--max-replicas-per-node", type=int,
                       help="at most this many replicas on one node (1: each on its own node)")
    group.add_argument("--target-ongoing-requests", type=float, help="autoscaling: requests per replica")
    group.add_argument("--max-batch-size", type=int, help="sequences decoded together (default 32)")
    group.add_argument("--max-context", type=int, help="prompt + completion tokens (default: the model's)")
    group.add_argument("--max-tokens-limit", type=int, help="largest max_tokens a request may ask for")
    group.add_argument("--api-key-env", help="environment variable that holds the API key")
    group.add_argument("--api-key-file", help="file that holds the API key")


_DEPLOY_FIELDS = ("route_prefix", "cpus_per_replica", "gpus_per_replica", "min_replicas", "max_replicas",
                  "max_replicas_per_node", "target_ongoing_requests", "max_batch_size", "max_context", "max_tokens_limit",
                  "api_key_env", "api_key_file")


def deploy_spec_fields(args: argparse.Namespace) -> dict:
    """The DeploySpec fields the flags of add_deploy_flags set (unset flags keep the spec's defaults)."""
    return {name: getattr(args, name) for name in _DEPLOY_FIELDS if getattr(args, name, None) is not None}
