"""How much gptctl's training path costs on top of a bare PyTorch loop.

Same GPT, batch, sequence length, seed and thread count, in one run:
  (a) bare single-process PyTorch AdamW loop on pre-loaded batches (bench/baseline.py)
  (b) the gptctl worker loop (shard streaming + DeepSpeed ZeRO-2) in this process, no Ray
  ((a) and (b) alternate for --rounds rounds; each figure is the median over rounds)
  (c) the full path: controller → Ray Train (1 worker) → the same worker loop, alternating for
      --ray-rounds rounds with bare rounds run beside it (Ray idle in the background), so a
      slow stretch of a noisy VM hits both; ratio_ray_quiet compares with (a) instead
  (d) a checkpoint upload in flight: the machine's last core plays the head node and the S3
      server (driver, Ray's daemons and Ray Train's controller, which registers each checkpoint
      in MLflow), the other cores the worker node; the steps of jobs with a checkpoint every 5
      steps are compared with those of jobs without (mean, median, slowest step)
Steady-state tokens/s is the median over steps after a warm-up; startup_s is submit → end of the
first step of (c) with warm caches (DeepSpeed op compiled, Ray running, a two-step job done on
it); startup_first_job_s is the same for that two-step job, the first after Ray started.

    python bench/train_overhead.py [--steps 40] [--threads N]  (default: the machine's cores - 1)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

from bench.baseline import bare_loop  # noqa: E402


def _tokens_per_s_from_mlflow(tracking_uri: str, run_id: str, skip: int) -> float:
    from mlflow.tracking import MlflowClient

    history = sorted(MlflowClient(tracking_uri).get_metric_history(run_id, "train/tokens_per_s"), key=lambda m: m.step)
    return statistics.median(m.value for m in history[skip:])


def _wait_until_quiet(limit_s: float = 30.0, busy_fraction: float = 0.1) -> None:
    """Start each timed run on a quiet machine: after a Ray job, Ray tears its actors down and
    starts fresh idle workers for a few seconds, which would land on the next run's steps."""
    deadline = time.time() + limit_s
    while time.time() < deadline and psutil.cpu_percent(interval=1.0) > 100 * busy_fraction:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    # one core stays with Ray's own processes (raylet, GCS, dashboard, Ray Train's controller and
    # helper actors: ~10 % of a core together), as a GPU node's CPU does; when training takes every
    # core they pre-empt one of torch's lock-stepped threads and the other waits (docs/performance.md)
    parser.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1))
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="alternating bare / worker rounds")
    parser.add_argument("--ray-rounds", type=int, default=5, help="alternating bare / Ray Train rounds")
    args = parser.parse_args()

    from orchestrator.ray_runtime import default_extensions_dir

    default_extensions_dir()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    torch.set_num_threads(args.threads)

    from orchestrator.data.corpus import write_demo_corpus
    from orchestrator.data.prepare import prepare_dataset
    from orchestrator.jobs.controller import prepare_job, run_training
    from orchestrator.spec import parse_spec
    from workers.data import train_batches_global
    from workers.engine import ensure_single_process_env
    from workers.train_loop import LocalHooks, run_worker

    work = Path(tempfile.mkdtemp(prefix="gptctl-bench-"))
    corpus = write_demo_corpus(work / "corpus", n_people=200)
    data = str(work / "data")
    prepare_dataset([str(corpus["pretrain"])], data, vocab_size=2048, seq_len=args.seq_len,
                    rows_per_shard=256, progress=False)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    spec = {
        "kind": "pretrain", "name": "bench", "data": data, "storage_path": str(work / "runs"),
        "tracking": {"uri": tracking, "experiment": "bench", "system_metrics_interval_s": 0},
        "model": {"preset": "tiny", "n_layer": args.n_layer, "n_head": 4, "n_embd": args.n_embd},
        "train": {"max_steps": args.steps, "micro_batch_size": args.batch, "lr": 1e-3, "min_lr": 1e-3,
                  "warmup_steps": 0, "eval_every": 10**6, "checkpoint_every": 10**6, "samples_at_eval": 0,
                  "zero_stage": 2},
        "cluster": {"num_workers": 1, "cpus_per_worker": args.threads},
    }

    def prepared_for_timing(job_spec: dict):
        """The job as every timed path runs it: no eval, no system metrics, the bench's threads."""
        prepared = prepare_job(parse_spec(job_spec))
        prepared.worker_job.val_shards = []
        prepared.worker_job.extra["torch_threads"] = args.threads
        return prepared

    # (a) and (b) alternate for --rounds rounds, so a noisy neighbour on a small VM slows both
    from model import GPTConfig
    from orchestrator.runs import JobRun

    ensure_single_process_env()
    tracker = JobRun(tracking, "bench")
    stream = train_batches_global(data, 0, 1, args.batch, 0)
    batches = [next(stream) for _ in range(min(args.steps, 20))]
    bare_rates, worker_rates = [], []
    for round_index in range(args.rounds):
        name = f"bench-worker-{round_index}"
        job = prepared_for_timing({**spec, "name": name}).worker_job
        model_config = GPTConfig.from_dict(job.model_config)
        job.run_id = tracker.open(name, "pretrain", "local", {})
        _wait_until_quiet()
        bare_rates.append(bare_loop(model_config, batches, args.steps, 1e-3, args.warmup))
        _wait_until_quiet()
        run_worker(job, LocalHooks())
        worker_rates.append(_tokens_per_s_from_mlflow(tracking, job.run_id, args.warmup))
        print(f"round {round_index + 1}: bare {bare_rates[-1]:,.0f} tokens/s, worker {worker_rates[-1]:,.0f} "
              f"({worker_rates[-1] / bare_rates[-1]:.3f})", flush=True)
    bare_rate, worker_rate = statistics.median(bare_rates), statistics.median(worker_rates)

    # (c) the full path through Ray Train, one worker; Ray started first so startup is warm
    from orchestrator.ray_runtime import ensure_ray

    ensure_ray()

    def submitted_to_first_step(job_spec: dict):
        """(seconds from submit to the end of step 1, run id)"""
        from mlflow.tracking import MlflowClient

        prepared = prepared_for_timing(job_spec)
        _wait_until_quiet()
        submitted = time.time()
        result = run_training(prepared, on_run=lambda _: None)
        first = min(MlflowClient(tracking).get_metric_history(result.run_id, "train/loss"), key=lambda m: m.step)
        return first.timestamp / 1000 - submitted, result.run_id

    # The first job on a Ray that has just started competes with Ray's own start-up (dashboard,
    # prestarted worker processes booting): a two-step job first, then (c) on the running Ray.
    startup_first_job_s, _ = submitted_to_first_step({**spec, "name": "bench-first", "train": {**spec["train"], "max_steps": 2}})
    startups, ray_rates, bare_beside_ray = [], [], []
    for round_index in range(args.ray_rounds):
        _wait_until_quiet()
        bare_beside_ray.append(bare_loop(model_config, batches, args.steps, 1e-3, args.warmup))
        startup, ray_run_id = submitted_to_first_step({**spec, "name": f"bench-ray-{round_index}"})
        startups.append(startup)
        ray_rates.append(_tokens_per_s_from_mlflow(tracking, ray_run_id, args.warmup))
        print(f"Ray round {round_index + 1}: bare {bare_beside_ray[-1]:,.0f} tokens/s, Ray Train {ray_rates[-1]:,.0f} "
              f"({ray_rates[-1] / bare_beside_ray[-1]:.3f}), startup {startup:.1f} s", flush=True)
    ray_rate, bare_ray_rate = statistics.median(ray_rates), statistics.median(bare_beside_ray)
    startup_s = statistics.median(startups)

    # (d) does a checkpoint upload slow the steps while it is in flight? Two machines on one: the
    # last core is the head node and S3 (this driver, Ray's daemons and Ray Train's controller,
    # which registers every checkpoint as an MLflow model version; the loopback S3 server), the
    # other cores are the worker node (the worker, its upload threads included, pins itself there).
    # Jobs with and without checkpoints every 5 steps, alternating.
    from mlflow.tracking import MlflowClient

    from infra.s3_endpoint import pointed_at, start_moto_server
    from workers import storage
    from workers.train_loop import pin_threads

    cores = sorted(os.sched_getaffinity(0))
    worker_cores, head_cores = cores[:-1] or cores, cores[-1:]

    def step_seconds(name: str, checkpoint_every: int) -> dict[int, float]:
        prepared = prepared_for_timing({**spec, "name": name, "storage_path": "s3://bench-ckpt/runs",
                                        "train": {**spec["train"], "checkpoint_every": checkpoint_every}})
        prepared.worker_job.extra.update({"torch_threads": len(worker_cores), "cpu_affinity": worker_cores})
        _wait_until_quiet()
        run = run_training(prepared, on_run=lambda _: None)
        history = MlflowClient(tracking).get_metric_history(run.run_id, "train/tokens_per_s")
        return {m.step: 1 / m.value for m in history if m.step > args.warmup}

    with start_moto_server(log_path=work / "moto.log") as s3, pointed_at(s3.url):
        driver = psutil.Process()
        for process in [driver, *driver.children(recursive=True)]:
            pin_threads(set(head_cores), process.pid)
        storage.ensure_bucket("s3://bench-ckpt")
        quiet_s, ckpt_s = {}, {}  # two alternating rounds each
        for round_index in range(2):
            quiet_s.update({(round_index, step): t for step, t in step_seconds(f"bench-no-ckpt-{round_index}", 10**6).items()})
            ckpt_s.update({(round_index, step): t for step, t in step_seconds(f"bench-ckpt-{round_index}", 5).items()})
    # An upload to the loopback server takes ~1 s, 3-4 steps here: with a checkpoint every 5 steps
    # almost every step has one in flight, and its cost lands on whichever step runs when the
    # upload threads do. The mean step carries all of it; the slowest step shows the worst one.
    quiet_mean = statistics.fmean(quiet_s.values())
    inflight_ratio = statistics.fmean(ckpt_s.values()) / quiet_mean
    ckpt_median_ratio = statistics.median(ckpt_s.values()) / statistics.median(quiet_s.values())
    worst_step_ratio = max(ckpt_s.values()) / quiet_mean

    print(f"model: {args.n_layer} layers x {args.n_embd}, seq {args.seq_len}, batch {args.batch}, "
          f"{args.threads} threads, {args.steps} steps (median after {args.warmup})")
    print(f"(a) bare PyTorch loop        : {bare_rate:10,.0f} tokens/s")
    print(f"(b) gptctl worker, ZeRO-2    : {worker_rate:10,.0f} tokens/s  ratio {worker_rate / bare_rate:.3f}")
    print(f"(c) Ray Train, 1 worker      : {ray_rate:10,.0f} tokens/s  ratio {ray_rate / bare_ray_rate:.3f} "
          f"(bare beside it {bare_ray_rate:,.0f}; vs (a) {ray_rate / bare_rate:.3f})")
    print(f"startup (submit → end of step 1): {startup_s:.1f} s; first job after Ray started: {startup_first_job_s:.1f} s")
    print(f"steps with a checkpoint upload in flight (checkpoints every 5 steps) / steps without: mean "
          f"{inflight_ratio:.3f}, median {ckpt_median_ratio:.3f}, slowest step {worst_step_ratio:.3f} "
          f"(worker on cpus {worker_cores}; head node and S3 server on {head_cores})")
    import ray

    ray.shutdown()
    print(json.dumps({"bench": "train_overhead", "bare_tokens_per_s": round(bare_rate),
                      "worker_tokens_per_s": round(worker_rate), "ray_tokens_per_s": round(ray_rate),
                      "ratio_worker": round(worker_rate / bare_rate, 3), "ratio_ray": round(ray_rate / bare_ray_rate, 3),
                      "ratio_ray_quiet": round(ray_rate / bare_rate, 3), "bare_beside_ray_tokens_per_s": round(bare_ray_rate),
                      "startup_s": round(startup_s, 2), "startup_first_job_s": round(startup_first_job_s, 2),
                      "ckpt_inflight_step_ratio": round(inflight_ratio, 3),
                      "ckpt_inflight_median_ratio": round(ckpt_median_ratio, 3),
                      "ckpt_worst_step_ratio": round(worst_step_ratio, 3)}))


if __name__ == "__main__":
    main()
