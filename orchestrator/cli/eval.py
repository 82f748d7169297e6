"""`gptctl eval`: EleutherAI lm-eval-harness tasks on a gptctl model, results to MLflow.

    gptctl eval CHECKPOINT|s3://…|models:/NAME@ALIAS --tasks hellaswag,lambada_openai
    gptctl eval http://127.0.0.1:8000/v1 --tokenizer CHECKPOINT --tasks …   # a deployed endpoint

A checkpoint is evaluated in this process (orchestrator/eval/lm_eval_model.py); an endpoint through
lm-eval's own `local-completions` model, which scores with /v1/completions' `echo` + `logprobs`.
The task names are checked before any model is loaded: an unknown one exits 2 naming --tasks
and the closest known names. Metrics land in MLflow as `lm_eval/<task>/<metric>` on the
checkpoint's training run (trainer_state.json), or on --run-id, or on a new run in experiment
`gptctl-eval`; the full results JSON is logged beside them as `lm_eval/results.json`.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

EXIT_OK, EXIT_BAD_INPUT = 0, 2
EXPERIMENT = "gptctl-eval"
EXAMPLE = """example (offline, with the tiny tasks in this repository):
  gptctl eval demo_output/runs/demo-pretrain/best --tasks gptctl_tiny --include-path examples/lm_eval_tasks
  gptctl eval http://127.0.0.1:8000/v1 --tokenizer demo_output/runs/demo-pretrain/best \\
      --tasks gptctl_tiny_mc --include-path examples/lm_eval_tasks"""


class EvalInputError(ValueError):
    """A flag of `gptctl eval` is wrong; the message names it."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="run lm-eval-harness tasks on a checkpoint or a deployed endpoint; metrics to MLflow",
        description="Run EleutherAI lm-eval-harness tasks on a checkpoint (in this process) or on a deployed "
                    "endpoint (through /v1/completions logprobs), and log lm_eval/<task>/<metric> to MLflow. "
                    "Needs the optional extra: pip install 'gptctl[eval]'. See docs/lm-eval.md.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="checkpoint dir, s3:// URI, models:/NAME@ALIAS, or http(s)://HOST:PORT[/v1]")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names (globs allowed)")
    p.add_argument("--include-path", help="directory of extra task YAMLs (e.g. examples/lm_eval_tasks)")
    p.add_argument("--limit", type=int, help="at most N documents per task (quick checks)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass / per HTTP request")
    p.add_argument("--device", default="cpu", help="torch device for an in-process checkpoint (cpu, cuda)")
    p.add_argument("--tokenizer", help="http target: the served checkpoint's dir or tokenizer.json "
                                       "(lm-eval counts context tokens on the client)")
    p.add_argument("--api-key-env", default="GPTCTL_API_KEY", help="http target: variable holding the API key")
    p.add_argument("--tracking-uri", help="MLflow (default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--run-id", help="log to this MLflow run (default: the checkpoint's training run, else a new one)")
    p.add_argument("--output", help="also write the results JSON to this file")
    p.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        return _eval(args)
    except EvalInputError as error:
        print(f"gptctl: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _eval(args: argparse.Namespace) -> int:
    try:
        import lm_eval
    except ImportError:
        raise EvalInputError("gptctl eval needs lm-eval: pip install 'gptctl[eval]'") from None
    if args.limit is not None and args.limit < 1:
        raise EvalInputError(f"--limit: must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise EvalInputError(f"--batch-size: must be >= 1, got {args.batch_size}")
    manager = task_manager(args.include_path)
    tasks = check_tasks(args.tasks, manager)  # before any model is loaded
    endpoint = args.target.startswith(("http://", "https://"))
    if endpoint and not args.tokenizer:
        raise EvalInputError("--tokenizer: an http(s) target needs the served checkpoint's tokenizer "
                             "(its directory or tokenizer.json), to count context tokens")
    client = tracking_client(args.tracking_uri)  # an unreachable server fails now, not after the eval
    if args.run_id:
        check_run(client, args.run_id)
    started = time.monotonic()
    if endpoint:
        model, model_args, run_id = "local-completions", _endpoint_args(args), args.run_id
    else:
        from orchestrator.eval.lm_eval_model import GPTCtlLM, checkpoint_run_id, local_checkpoint

        local = local_checkpoint(args.target, args.tracking_uri)
        model, model_args = GPTCtlLM(checkpoint=local, batch_size=args.batch_size, device=args.device), None
        run_id = args.run_id or checkpoint_run_id(local)
        if run_id and not args.run_id and not run_exists(client, run_id):
            print(f"[gptctl] the checkpoint's run {run_id} is not in {client.tracking_uri}; logging to a new run")
            run_id = None
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, task_manager=manager, limit=args.limit,
        num_fewshot=args.num_fewshot, batch_size=args.batch_size, log_samples=False, bootstrap_iters=0,
    )
    from lm_eval.utils import make_table

    print(make_table(results))
    text = results_json(results)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    run_id = log_to_mlflow(client, results, text, run_id, args.target)
    print(f"[gptctl] lm-eval {','.join(tasks)} on {args.target} in {time.monotonic() - started:.1f} s; "
          f"metrics lm_eval/<task>/<metric> on MLflow run {run_id}")
    return EXIT_OK


# ---- tasks --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None):
    """lm-eval's task index (built once per process: indexing its ~15k task YAMLs takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise EvalInputError(f"--include-path: {include_path} is not a directory of task YAMLs")
    return TaskManager(include_path=include_path)


def check_tasks(spec: str, manager) -> list[str]:
    """The task names in --tasks, or EvalInputError naming the unknown ones and close matches."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise EvalInputError("--tasks: give at least one lm-eval task name")
    known = manager.all_tasks
    unknown = [n for n in names if not manager.match_tasks([n]) and not Path(n).is_file()]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean: {', '.join(close)}?)" if close else ""))
        raise EvalInputError(
            f"--tasks: unknown lm-eval task(s) {'; '.join(hints)}. Valid names are lm-eval's tasks, groups and "
            f"tags ({len(known)} known; list them with `lm-eval ls tasks`) and those in --include-path")
    return names


# ---- endpoint -----------------------------------------------------------------------------
def _endpoint_args(args: argparse.Namespace) -> dict:
    """model_args for lm-eval's local-completions against a gptctl deployment (simple_evaluate adds
    batch_size: prompts per HTTP request)."""
    import os

    import httpx

    root = args.target.rstrip("/").removesuffix("/v1")
    key = os.environ.get(args.api_key_env) or None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = httpx.get(f"{root}/v1/models", headers=headers, timeout=30.0)
    reply.raise_for_status()
    card = reply.json()["data"][0]
    return {
        "model": card["id"], "base_url": f"{root}/v1/completions", "tokenizer_backend": "huggingface",
        "tokenizer": hf_tokenizer_dir(args.tokenizer, card["max_model_len"]),
        # token ids go over the wire, so the server scores exactly the tokens lm-eval counted
        "tokenized_requests": True, "max_length": card["max_model_len"], "header": headers or None,
    }


def hf_tokenizer_dir(source: str, max_length: int) -> str:
    """A temporary directory transformers.AutoTokenizer loads offline, from a gptctl tokenizer."""
    from model import GPTTokenizer
    from model.hf import write_hf_tokenizer_files

    try:
        tokenizer = GPTTokenizer.load(source)
    except (FileNotFoundError, ValueError) as error:
        raise EvalInputError(f"--tokenizer: {error}") from None
    out = tempfile.mkdtemp(prefix="gptctl-eval-tok-")
    write_hf_tokenizer_files(tokenizer, max_length, out)
    return out


# ---- results ------------------------------------------------------------------------------
def results_json(results: dict) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, sort_keys=True)


def metric_values(results: dict) -> dict[str, float]:
    """`lm_eval/<task>/<metric>` -> value; a filter other than lm-eval's "none" is appended to the name."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, (str, bool)) or value is None:
                continue  # alias, name, "N/A" stderr
            metric, filter_name = key.split(",", 1)
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            out[f"lm_eval/{task}/{name}"] = float(value)
    return out


def tracking_client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    from orchestrator.runs import check_tracking_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_reachable(uri, needed_by="--tracking-uri")
    return MlflowClient(tracking_uri=uri)


def run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
        return True
    except MlflowException:
        return False


def check_run(client, run_id: str) -> None:
    if not run_exists(client, run_id):
        raise EvalInputError(f"--run-id: no run {run_id!r} in the MLflow tracking store {client.tracking_uri}")


def log_to_mlflow(client, results: dict, text: str, run_id: str | None, target: str) -> str:
    """Metrics + results JSON on run_id, or on a new run in experiment gptctl-eval; returns the run id."""
    from mlflow.entities import Metric

    new_run = run_id is None
    if new_run:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
        run_id = client.create_run(experiment_id, tags={"gptctl.kind": "lm_eval", "gptctl.eval_target": target},
                                   run_name=f"lm-eval {Path(target.rstrip('/')).name}").info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in sorted(metric_values(results).items())]
    client.log_batch(run_id, metrics=metrics)
    client.log_text(run_id, text, "lm_eval/results.json")
    if new_run:
        client.set_terminated(run_id)
    return run_id
