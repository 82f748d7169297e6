"""Training across nodes: 1 vs 2 workers on separate nodes, the all-reduce share of a step, and
the time a job takes to resume after losing a node.

One loopback cluster (infra/loopback_cluster.py): a head with 1 CPU (job drivers) and three
worker nodes with 1 CPU and `trainer_node: 1` each, every node its own `ray start`. Local data,
checkpoints and a sqlite MLflow store on the one disk they share (`cluster.shared_storage`).
Jobs go in through the Jobs API, each worker on its own node (`placement: spread`):

  (a) 1 worker, ZeRO-0: the baseline tokens/s
  (b) 2 workers, ZeRO-0, same micro-batch per worker: tokens/s → scaling_2x = (b) / (a); and
      DeepSpeed's own timers (`wall_clock_breakdown`): the gradient all-reduce (gloo, between the
      nodes) against the whole step (forward + backward + optimizer step) → allreduce_share
  (c) 2 workers, ZeRO-2, `max_failures: 1`, checkpoint every 4 steps, the third node spare: after
      step 5 one worker's node is killed (its `ray start`, raylet, agents and workers, SIGKILL by
      PID); node_loss_resume_s = kill → the first step the restarted group logs to MLflow
      (detection of the dead node, a new worker group on the spare, DeepSpeed init, checkpoint load,
      one step). Target ≤ 30 s.

Tokens/s is the median of the job's `train/tokens_per_s` after a warm-up; the all-reduce share is
the median over steps of rank 0's timers.

    python bench/multinode_scaling.py [--steps 24] [--n-embd 64]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from infra.loopback_cluster import start_loopback_cluster, step_times, train_worker_actors, wait_for  # noqa: E402

NODE_RESOURCE = "trainer_node"
TIMER = re.compile(r"time \(ms\) \| fwd_microstep: ([\d.]+) \| bwd_microstep: ([\d.]+) \| bwd_inner_microstep: "
                   r"([\d.]+) \| bwd_allreduce_microstep: ([\d.]+) \| step_microstep: ([\d.]+)")


def _spec(root: Path, name: str, workers: int, steps: int, zero_stage: int, args, **extra) -> dict:
    spec = {
        "kind": "pretrain", "name": name, "data": str(root / "data"), "storage_path": str(root / "runs"),
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "multinode-bench",
                     "model_versions": "final", "system_metrics_interval_s": 0},
        "model": {"preset": "tiny", "n_layer": args.n_layer, "n_head": 2, "n_embd": args.n_embd},
        "train": {"max_steps": steps, "micro_batch_size": args.batch, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2,
                  "eval_every": 1000, "eval_batches": 1, "checkpoint_every": 1000, "samples_at_eval": 0,
                  "zero_stage": zero_stage},
        "cluster": {"num_workers": workers, "cpus_per_worker": 1, "placement": "spread", "shared_storage": True,
                    "resources_per_worker": {NODE_RESOURCE: 1}},
    }
    for section, values in extra.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


def _submit(cluster, root: Path, spec: dict) -> str:
    from orchestrator.jobs.submit import submit_job

    path = root / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return submit_job(str(path), cluster.head.dashboard_url, out=lambda _: None)


def _run_id(root: Path, name: str) -> str | None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("multinode-bench")
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], f"tags.`gptctl.job` = '{name}'")
    return runs[0].info.run_id if runs else None


def _finish(cluster, job_id: str, timeout: float = 600) -> str:
    from orchestrator.jobs.submit import client_for

    client = client_for(cluster.head.dashboard_url)
    status = wait_for(lambda: (s := str(client.get_job_status(job_id).value)) in ("SUCCEEDED", "FAILED", "STOPPED")
                      and s, timeout, f"job {job_id}", poll_s=1.0)
    logs = client.get_job_logs(job_id)
    if status != "SUCCEEDED":
        raise SystemExit(f"job {job_id} {status}:\n{logs[-4000:]}")
    return logs


def _tokens_per_s(root: Path, name: str, skip: int) -> float:
    points = step_times(f"sqlite:///{root / 'mlflow.db'}", _run_id(root, name), "train/tokens_per_s")
    return statistics.median(value for step, _, value in points if step > skip)


def _allreduce_share(logs: str, skip: int) -> tuple[float, float]:
    """(median all-reduce ms, median share of the step) from rank 0's DeepSpeed timer lines."""
    rows = [tuple(map(float, m.groups())) for m in TIMER.finditer(logs)][skip:]
    if not rows:
        raise SystemExit("no DeepSpeed timer lines in the job log (train.deepspeed.wall_clock_breakdown)")
    allreduce = statistics.median(r[3] for r in rows)
    share = statistics.median(r[3] / (r[0] + r[1] + r[4]) for r in rows)
    return allreduce, share


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--kill-after", type=int, default=5, help="kill a worker node after this step")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from orchestrator.data.corpus import write_demo_corpus
    from orchestrator.data.prepare import prepare_dataset
    from orchestrator.ray_runtime import default_extensions_dir

    default_extensions_dir()
    root = Path(tempfile.mkdtemp(prefix="nodeloss-bench-", dir="/tmp"))
    corpus = write_demo_corpus(root / "corpus", n_people=120, seed=3)
    prepare_dataset([str(corpus["pretrain"])], str(root / "data"), vocab_size=300, seq_len=64,
                    rows_per_shard=256, progress=False)
    timers = {"deepspeed": {"wall_clock_breakdown": True}}
    cluster = start_loopback_cluster(3, {NODE_RESOURCE: 1}, prefix="nodeloss-bench")
    try:
        # (a) and (b): the same job on one node and on two
        _finish(cluster, _submit(cluster, root, _spec(root, "one", 1, args.steps, 0, args, train=timers)))
        one = _tokens_per_s(root, "one", args.warmup)
        logs = _finish(cluster, _submit(cluster, root, _spec(root, "two", 2, args.steps, 0, args, train=timers)))
        two = _tokens_per_s(root, "two", args.warmup)
        allreduce_ms, share = _allreduce_share(logs, args.warmup)
        print(f"1 worker: {one:,.0f} tokens/s   2 workers on 2 nodes: {two:,.0f} tokens/s   "
              f"scaling {two / one:.2f}x")
        print(f"gradient all-reduce (gloo, 2 nodes): {allreduce_ms:.1f} ms = {share:.1%} of a step")

        # (c): lose a worker's node after step kill_after; the spare node takes over
        name = "lose-a-node"
        spec = _spec(root, name, 2, 12, 2, args, train={"checkpoint_every": 4},
                     cluster={"max_failures": 1})
        job_id = _submit(cluster, root, spec)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        run_id = wait_for(lambda: _run_id(root, name), 120, "the job's MLflow run")
        wait_for(lambda: any(step >= args.kill_after for step, _, _ in step_times(uri, run_id)), 180,
                 f"step {args.kill_after}")
        victim = cluster.node(train_worker_actors(cluster.head)[0]["node_id"])
        killed_at = time.time()
        victim.kill()
        _finish(cluster, job_id)
        resumed = [t for step, t, _ in step_times(uri, run_id) if t > killed_at]
        resume_s = min(resumed) - killed_at
        print(f"node lost after step {args.kill_after}: first resumed step {resume_s:.1f} s after the kill "
              f"(target ≤ 30 s)")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"bench": "multinode_scaling", "tokens_per_s_1": round(one), "tokens_per_s_2": round(two),
                      "scaling_2x": round(two / one, 3), "allreduce_ms": round(allreduce_ms, 2),
                      "allreduce_share": round(share, 3), "node_loss_resume_s": round(resume_s, 1),
                      "model": f"{args.n_layer}x{args.n_embd}", "batch_per_worker": args.batch}))


if __name__ == "__main__":
    main()
