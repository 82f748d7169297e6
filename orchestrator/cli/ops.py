"""Operations commands for `gptctl` (registered in orchestrator/cli/__init__.py):

  gptctl schema [--kind K]                      JSON schema of a job spec file
  gptctl resolve SPEC                           the validated spec as it will run, secrets as ***
  gptctl status TARGET [--wait]                 a Ray job (id), a run / job name (MLflow progress) or a spec file
  gptctl logs JOB [--follow]                    a Ray job's output
  gptctl stop JOB                               stop a Ray job
  gptctl list [--all]                           gptctl's jobs on the cluster
  gptctl report RUN [--out FILE.png]            loss / lr / tokens-per-s curves of a run
  gptctl stack up|down|status|env               the local S3 + MLflow + Ray stack

Jobs commands take --address http://HEAD:8265 (else $GPTCTL_RAY_ADDRESS, $RAY_API_SERVER_ADDRESS,
an http:// $RAY_ADDRESS, or a running local stack). Exit codes: 0 ok / SUCCEEDED / still
running, 1 FAILED (or a service that would not start), 2 bad input (unknown job or run,
unreachable address, invalid spec), 3 STOPPED.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _guard(handler):
    """Map this module's own errors to exit codes; the rest goes to cli.main's handling."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from orchestrator.jobs.status import RunNotFound
        from orchestrator.jobs.submit import JobsError
        from orchestrator.stack import StackError

        try:
            return handler(args)
        except (JobsError, RunNotFound) as error:
            print(f"gptctl: error: {error.args[0] if error.args else error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except StackError as error:
            print(f"gptctl: failed: {error}", file=sys.stderr)
            return EXIT_FAILED

    return run


# ----------------------------------------------------------------------------- submit (called by cli/__init__.py)

def submit_dispatch(spec_path: str, address: str | None, wait: bool = False) -> int | None:
    """What `gptctl submit` hands over before its own path: an http(s):// address goes through
    the Ray Jobs API; a `kind: pipeline` spec runs its stages. None: neither, cli/__init__.py runs it."""
    if address and address.startswith(("http://", "https://")):
        from orchestrator.jobs.submit import JobsError, submit_command

        try:
            return submit_command(spec_path, address, wait=wait, out=lambda text: print(text, flush=True))
        except JobsError as error:
            print(f"gptctl: error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
    from orchestrator.spec import PipelineSpec, load_spec

    spec = load_spec(spec_path)
    if isinstance(spec, PipelineSpec):
        from orchestrator.jobs.pipeline import submit_pipeline

        return submit_pipeline(spec, address=address)
    return None


# ----------------------------------------------------------------------------- spec commands

def _cmd_schema(args: argparse.Namespace) -> int:
    from orchestrator.spec import json_schema

    print(json.dumps(json_schema(args.kind), indent=2))
    return EXIT_OK


def _cmd_resolve(args: argparse.Namespace) -> int:
    from orchestrator.spec import load_spec, render_spec

    spec = load_spec(args.spec)
    print(f"# {args.spec}: valid {spec.kind} spec '{spec.name}' (env interpolated, defaults filled, secrets ***)")
    print(render_spec(spec), end="")
    return EXIT_OK


# ----------------------------------------------------------------------------- jobs

def _looks_like_job_id(target: str) -> bool:
    return target.startswith(("gptctl-", "raysubmit_"))


def _status_of_spec(args: argparse.Namespace) -> int:
    from orchestrator.jobs.status import format_progress, run_progress
    from orchestrator.spec import DeploySpec, PipelineSpec, load_spec

    spec = load_spec(args.target)
    if isinstance(spec, PipelineSpec):
        from orchestrator.jobs.pipeline import format_state, load_state

        state = load_state(spec)
        print(format_state(spec, state))
        return EXIT_FAILED if (state or {}).get("status") == "failed" else EXIT_OK
    if isinstance(spec, DeploySpec):
        print(f"{args.target}: a deploy spec has no training run; query it with `gptctl generate --url …`")
        return EXIT_OK
    print(format_progress(run_progress(spec.name, args.tracking_uri or spec.tracking.uri)))
    return EXIT_OK


def _print_run_progress(target: str, tracking_uri: str | None, quiet_missing: bool) -> None:
    from orchestrator.jobs.status import RunNotFound, format_progress, run_progress

    try:
        print(format_progress(run_progress(target, tracking_uri)))
    except RunNotFound as error:
        if not quiet_missing:
            raise
        print(f"(no MLflow run yet: {error})")
    except Exception as error:  # noqa: BLE001 - the tracking server may be out of reach from here
        print(f"(MLflow progress unavailable: {type(error).__name__}: {error})")


def _print_pipeline_state(uri: str) -> None:
    from orchestrator.jobs.pipeline import format_state, read_state

    try:
        print(format_state(None, read_state(uri), where=uri))
    except Exception as error:  # noqa: BLE001 - storage may be out of reach from here
        print(f"(pipeline state unavailable: {type(error).__name__}: {error})")


def _cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.jobs import submit as jobs
    from orchestrator.jobs.status import RunNotFound

    if args.target.endswith((".yaml", ".yml")) and Path(args.target).is_file():
        return _status_of_spec(args)
    job_like = _looks_like_job_id(args.target)
    try:
        address = jobs.resolve_address(args.address)
    except jobs.JobsError:
        address = None
    info = None
    if address is not None:
        try:
            info = jobs.job_info(address, args.target)
        except jobs.JobsError:
            if job_like:
                raise
    if info is not None:
        if args.wait:
            while str(info.status.value) not in jobs.TERMINAL:
                time.sleep(2)
                info = jobs.job_info(address, args.target)
        print(jobs.describe_job(info))
        meta = info.metadata or {}
        if meta.get(jobs.METADATA_KIND) in ("pretrain", "finetune"):
            try:
                workers = jobs.train_workers(address, info)
            except Exception as error:  # noqa: BLE001 - where workers ran is extra; the status stands
                print(f"(worker placement unavailable: {type(error).__name__}: {error})")
            else:
                if workers:
                    print(jobs.describe_workers(workers))
            print()
            tracking = args.tracking_uri or meta.get(jobs.METADATA_TRACKING) or None
            _print_run_progress(meta[jobs.METADATA_JOB], tracking, quiet_missing=True)
        elif meta.get(jobs.METADATA_PIPELINE_STATE):
            print()
            _print_pipeline_state(meta[jobs.METADATA_PIPELINE_STATE])
        return jobs.exit_code(info.status, info.driver_exit_code)
    try:
        _print_run_progress(args.target, args.tracking_uri, quiet_missing=False)
    except RunNotFound as error:
        if job_like and address is None:
            raise jobs.JobsError(f"{error}; for a Ray job id pass --address http://HEAD:8265") from None
        raise
    return EXIT_OK


def _cmd_logs(args: argparse.Namespace) -> int:
    from orchestrator.jobs import submit as jobs

    address = jobs.resolve_address(args.address)
    if args.follow:
        status = jobs.follow_logs(address, args.job, out=lambda text: print(text, flush=True))
        print(f"[gptctl] job {args.job} {status}", file=sys.stderr)
        return jobs.ended_exit_code(address, args.job, status)
    print(jobs.job_logs(address, args.job), end="")
    return EXIT_OK


def _cmd_stop(args: argparse.Namespace) -> int:
    from orchestrator.jobs import submit as jobs

    address = jobs.resolve_address(args.address)
    status = jobs.stop_job(address, args.job, wait_s=args.timeout)
    print(f"[gptctl] job {args.job}: {status}")
    if status == "STOPPED":
        return EXIT_OK
    if status in jobs.TERMINAL:
        return jobs.ended_exit_code(address, args.job, status)  # it had already ended on its own
    print(f"gptctl: failed: job {args.job} still {status} after {args.timeout:.0f} s", file=sys.stderr)
    return EXIT_FAILED


def _cmd_list(args: argparse.Namespace) -> int:
    from orchestrator.jobs import submit as jobs

    address = jobs.resolve_address(args.address)
    print(jobs.format_jobs(jobs.list_jobs(address, include_all=args.all)))
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.jobs.report import write_report

    path = write_report(args.run, args.out, tracking_uri=args.tracking_uri)
    print(f"[gptctl] wrote {path}")
    return EXIT_OK


# ----------------------------------------------------------------------------- stack

def _services(text: str) -> tuple[str, ...]:
    from orchestrator.stack import SERVICES

    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in chosen if name not in SERVICES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(SERVICES)}")
    return chosen


def _cmd_stack(args: argparse.Namespace) -> int:
    from orchestrator import stack

    if args.stack_command == "up":
        info = stack.up(args.state_dir, services=args.services, s3_backend=args.s3, num_cpus=args.num_cpus,
                        out=lambda text: print(text, flush=True))
        print(stack.format_status(info))
        wanted = [info["services"][name]["healthy"] for name in args.services]
        return EXIT_OK if all(wanted) else EXIT_FAILED
    if args.stack_command == "down":
        stack.down(args.state_dir, services=args.services, out=lambda text: print(text, flush=True))
        return EXIT_OK
    info = stack.status(args.state_dir)
    if args.stack_command == "env":
        if not info["services"]:
            print(f"gptctl: error: no stack at {info['state_dir']} (run `gptctl stack up`)", file=sys.stderr)
            return EXIT_BAD_INPUT
        print("".join(f"export {key}={value}\n" for key, value in info["env"].items()), end="")
        return EXIT_OK
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(stack.format_status(info))
    return EXIT_OK if info["up"] else EXIT_FAILED


# ----------------------------------------------------------------------------- registration

def _address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray dashboard / Jobs API URL, e.g. http://HEAD:8265 "
                                          "(default: $RAY_API_SERVER_ADDRESS, an http:// $RAY_ADDRESS, else a running local stack)")


def register(sub: argparse._SubParsersAction) -> None:
    schema = sub.add_parser("schema", help="print the JSON schema of job spec files")
    schema.add_argument("--kind", choices=["pretrain", "finetune", "deploy", "pipeline"], help="only this kind")
    schema.set_defaults(handler=_guard(_cmd_schema))

    resolve = sub.add_parser("resolve", help="validate a spec and print it as it will run (secrets ***)")
    resolve.add_argument("spec")
    resolve.set_defaults(handler=_guard(_cmd_resolve))

    status = sub.add_parser("status", help="a job's status and training progress (step, loss, tokens/s, ETA)")
    status.add_argument("target", help="Ray job id, MLflow run id, job name, or a spec file (pipeline: its stages)")
    _address(status)
    status.add_argument("--tracking-uri", help="MLflow tracking URI (default: the job's, else $MLFLOW_TRACKING_URI)")
    status.add_argument("--wait", action="store_true", help="wait for a Ray job to end; exit code = its outcome")
    status.set_defaults(handler=_guard(_cmd_status))

    logs = sub.add_parser("logs", help="print a submitted job's output")
    logs.add_argument("job")
    _address(logs)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(handler=_guard(_cmd_logs))

    stop = sub.add_parser("stop", help="stop a submitted job")
    stop.add_argument("job")
    _address(stop)
    stop.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to end")
    stop.set_defaults(handler=_guard(_cmd_stop))

    listing = sub.add_parser("list", help="jobs submitted to the cluster")
    _address(listing)
    listing.add_argument("--all", action="store_true", help="also jobs not submitted by gptctl")
    listing.set_defaults(handler=_guard(_cmd_list))

    report = sub.add_parser("report", help="PNG of a run's loss (train, val), learning rate and tokens/s")
    report.add_argument("run", help="MLflow run id or job name")
    report.add_argument("--out", help="PNG path (default: <job>-report.png)")
    report.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    report.set_defaults(handler=_guard(_cmd_report))

    stack = sub.add_parser("stack", help="local S3 (persistent) + MLflow server + Ray head on loopback")
    actions = stack.add_subparsers(dest="stack_command", required=True)
    for name, text in (("up", "start what is not running"), ("down", "stop what `up` started"),
                       ("status", "each service's URL and health, and the env to export"),
                       ("env", "only the export lines: eval \"$(gptctl stack env)\"")):
        action = actions.add_parser(name, help=text)
        action.add_argument("--state-dir", default=os.environ.get("GPTCTL_STACK_DIR"),
                            help="pid files, logs and data (default ./.gptctl/stack)")
        if name in ("up", "down"):
            action.add_argument("--services", type=_services, default=("s3", "mlflow", "ray"),
                                help="comma-separated subset of s3,mlflow,ray (default: all)")
        if name == "up":
            action.add_argument("--s3", choices=["s3rver", "moto"], help="S3 server (default s3rver: persistent)")
            action.add_argument("--num-cpus", type=int, help="CPUs the Ray head offers (default max(cores, 4))")
        if name == "status":
            action.add_argument("--json", action="store_true")
        action.set_defaults(handler=_guard(_cmd_stack))
