"""`gptctl`: the command line a user touches. Bad input exits 2 with a message naming the
field or file; a job that started and failed exits 1."""
from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2



def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser("prepare", help="tokenize .txt/.jsonl into WebDataset shards + manifest.json")
    prepare.add_argument("inputs", nargs="+", help=".txt/.jsonl files or directories, local or s3://")
    prepare.add_argument("--out", required=True, help="output dir or s3://bucket/prefix")
    prepare.add_argument("--vocab-size", type=int, default=4096)
    prepare.add_argument("--seq-len", type=int, default=128)
    prepare.add_argument("--tokenizer", help="existing tokenizer.json or checkpoint dir (required for fine-tuning data)")
    prepare.add_argument("--val-fraction", type=float, default=0.05)
    prepare.add_argument("--val-inputs", nargs="+", help="files that form the validation split (a held-out task set)")
    prepare.add_argument("--rows-per-shard", type=int, default=4096)
    prepare.add_argument("--rows-per-member", type=int, default=256, help="rows per tar member (the unit read and shuffled)")
    prepare.add_argument("--engine", choices=("local", "ray"), default="local",
                         help="tokenize in this process (local) or with Ray Data across the cluster (ray)")
    prepare.add_argument("--address", help="Ray address for --engine ray; default: the embedded local Ray")
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--no-progress", action="store_true")
    prepare.set_defaults(handler=_cmd_data)


def build_parser() -> argparse.ArgumentParser:
    from orchestrator.cli.serve import add_deploy_flags, add_sampling_flags, add_wait_flag, default_url

    from orchestrator.cli.help import QUICK_START

    parser = argparse.ArgumentParser(prog="gptctl", description=QUICK_START.splitlines()[0])
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (sets AWS_ENDPOINT_URL)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)

    validate = sub.add_parser("validate", help="check a job spec without running anything")
    validate.add_argument("spec")
    validate.add_argument("--print", dest="print_spec", action="store_true",
                          help="print the resolved spec (secrets as ***)")
    validate.set_defaults(handler=_cmd_validate)

    submit = sub.add_parser("submit", help="run a pretrain/finetune/deploy job spec")
    submit.add_argument("spec")
    submit.add_argument("--address", help="http://HEAD:8265: submit through the Ray Jobs API; host:port / ray:// / "
                        "auto: join that cluster from here; default: embedded local Ray")
    submit.add_argument("--wait", action="store_true",
                        help="with an http:// address: follow the job to its end; exit 0 SUCCEEDED, 1 FAILED, 3 STOPPED")
    submit.set_defaults(handler=_cmd_submit)

    deploy = sub.add_parser("deploy", help="serve a checkpoint (dir, s3:// or a deploy spec) with Ray Serve")
    deploy.add_argument("target", help="checkpoint dir / s3:// URI, or a deploy spec .yaml")
    deploy.add_argument("--name", default="gptctl")
    deploy.add_argument("--host", default="127.0.0.1")
    deploy.add_argument("--port", type=int, default=int(os.environ.get("GPTCTL_PORT", "8000")),
                        help="HTTP port (default $GPTCTL_PORT, else 8000)")
    deploy.add_argument("--replicas", type=int, default=1)
    deploy.add_argument("--address", help="Ray address; without one the app lives until Ctrl-C")
    deploy.add_argument("--tracking-uri", help="MLflow registry for a models:/NAME@ALIAS target")
    add_deploy_flags(deploy)
    deploy.set_defaults(handler=_cmd_deploy)

    generate = sub.add_parser("generate", help="query a deployed model over HTTP")
    generate.add_argument("prompt")
    generate.add_argument("--url", default=default_url(), help="the app's base URL (default $GPTCTL_URL, else "
                          "http://127.0.0.1:$GPTCTL_PORT, else port 8000)")
    add_sampling_flags(generate, max_tokens=64)
    generate.add_argument("--raw", action="store_true", help="don't wrap the prompt in the fine-tuning template")
    generate.add_argument("--json", action="store_true", help="print the whole response")
    add_wait_flag(generate)
    generate.set_defaults(handler=_cmd_generate)

    demo = sub.add_parser("demo", help="prepare → pre-train → fine-tune → deploy → generate, all local")
    demo.add_argument("--workdir", default="demo_output")
    demo.add_argument("--port", type=int, default=8000)
    demo.set_defaults(handler=_cmd_demo)
    # one module per command group: each defines `register(subparsers)` and gives every parser
    # `set_defaults(handler=fn)` where fn(args) -> exit code
    from orchestrator.cli import eval as eval_commands, interop, ops, serve

    for group in (interop, ops, serve, eval_commands):
        group.register(sub)
    from orchestrator.cli.help import add_examples

    return add_examples(parser)


def _cmd_data(args: argparse.Namespace) -> int:
    from orchestrator.data.prepare import prepare_dataset

    manifest = prepare_dataset(
        args.inputs, args.out, vocab_size=args.vocab_size, seq_len=args.seq_len, tokenizer=args.tokenizer,
        val_fraction=args.val_fraction, rows_per_shard=args.rows_per_shard, rows_per_member=args.rows_per_member,
        seed=args.seed, progress=not args.no_progress, val_inputs=args.val_inputs,
        engine=args.engine, ray_address=args.address,
    )
    splits = ", ".join(f"{name}: {len(shards)} shards / {manifest.total_rows(name)} rows"
                       for name, shards in manifest.splits.items())
    print(f"[gptctl] wrote {manifest.kind} data to {args.out} ({splits})")
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.spec import load_spec

    spec = load_spec(args.spec)
    print(f"[gptctl] {args.spec}: valid {spec.kind} spec '{spec.name}'")
    if args.print_spec:
        from orchestrator.spec import render_spec

        print(render_spec(spec), end="")
    return EXIT_OK


def _cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.cli.ops import submit_dispatch
    from orchestrator.spec import DeploySpec, load_spec

    handled = submit_dispatch(args.spec, args.address, wait=args.wait)  # Jobs API, pipelines
    if handled is not None:
        return handled
    spec = load_spec(args.spec)
    if isinstance(spec, DeploySpec):
        return _serve(spec, args.address)
    from orchestrator.jobs.controller import prepare_job, run_training

    result = run_training(prepare_job(spec), address=args.address)
    print(f"[gptctl] {spec.kind} '{spec.name}' finished at step {result.step}")
    print(f"[gptctl] checkpoint: {result.checkpoint}")
    print(f"[gptctl] MLflow run: {result.run_id}; model {result.model_name} version {result.model_version}")
    return EXIT_OK


def _cmd_deploy(args: argparse.Namespace) -> int:
    from orchestrator.cli.serve import deploy_spec_fields
    from orchestrator.spec import DeploySpec, load_spec

    if args.target.endswith((".yaml", ".yml")):
        spec = load_spec(args.target)
        if not isinstance(spec, DeploySpec):
            raise ValueError(f"{args.target}: kind is {spec.kind}; `gptctl deploy` expects kind: deploy")
    else:
        spec = DeploySpec(kind="deploy", name=args.name, checkpoint=args.target, host=args.host,
                          port=args.port, num_replicas=args.replicas, tracking_uri=args.tracking_uri,
                          **deploy_spec_fields(args))
    return _serve(spec, args.address)


def _serve(spec, address: str | None) -> int:
    from orchestrator.serve.deploy import deploy, serve_until_interrupted

    url = deploy(spec, address=address)
    print(f"[gptctl] serving {spec.checkpoint} at {url} (POST /v1/completions, /v1/chat/completions, "
          f"GET /v1/models, POST /generate, GET /healthz)", flush=True)
    if address is None:
        serve_until_interrupted()
    return EXIT_OK


def _cmd_generate(args: argparse.Namespace) -> int:
    from orchestrator.serve.deploy import query, wait_healthy

    if args.wait:
        wait_healthy(args.url, args.wait)
    reply = query(args.url, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, use_template=False if args.raw else None)
    print(json.dumps(reply, indent=2) if args.json else reply["text"])
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.cli.demo import run_demo

    run_demo(args.workdir, port=args.port)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a bare `gptctl` asks what to do: answer with the quick start, not a usage error
        from orchestrator.cli.help import QUICK_START

        print(QUICK_START, end="")
        return EXIT_OK
    args = build_parser().parse_args(argv)
    if args.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint
    from orchestrator.jobs.errors import BAD_INPUT_ERRORS, FAILED_ERRORS

    try:
        return args.handler(args)
    except BAD_INPUT_ERRORS as error:
        print(f"gptctl: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FAILED_ERRORS as error:
        print(f"gptctl: failed: {error}", file=sys.stderr)
        return EXIT_FAILED
