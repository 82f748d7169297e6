"""What `train.checkpoint_upload` trades: a worker's memory and CPU against upload time.

Uploads one checkpoint file to a loopback S3 endpoint (moto_server) the way Ray Train's async
upload does (`pyarrow.fs.copy_files`, one thread, 64 MB chunks: Ray's `_pyarrow_fs_copy_files`),
through the filesystem `orchestrator.ray_runtime.train_storage` builds, once per mode per round:
  bounded   the default: one part of a file in flight, one chunk in memory
  parallel  the baseline, pyarrow's own default (background writes): parts go out concurrently
Each upload runs in a fresh process, so pyarrow's memory pool starts empty, as in a worker's first
upload. `--cap-mb-per-s` puts infra/fault_proxy.py in front of the endpoint and limits each
connection's upload rate, as a real link does; 0 talks to moto directly (loopback: CPU-bound).

    python bench/checkpoint_upload.py [--size-mb 64] [--cap-mb-per-s 25] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RAY_CHUNK_BYTES = 64 << 20  # Ray Train's `_pyarrow_fs_copy_files` default

# Ray's upload call: prints wall seconds, this process's CPU seconds, pyarrow's peak pool bytes
UPLOAD = """
import resource, sys, time
import pyarrow
import pyarrow.fs
from orchestrator.ray_runtime import train_storage

path, filesystem = train_storage(sys.argv[2], parallel_parts=sys.argv[3] == "parallel")
before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
pyarrow.fs.copy_files(sys.argv[1], path, destination_filesystem=filesystem, use_threads=False,
                      chunk_size=int(sys.argv[4]))
wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
print(wall, cpu, pyarrow.default_memory_pool().max_memory())
"""


def upload_once(directory: Path, uri: str, mode: str, chunk_bytes: int = RAY_CHUNK_BYTES) -> tuple[float, float, int]:
    """Upload `directory` to `uri` as Ray Train does, in a fresh process (so pyarrow's memory pool
    starts empty); (wall seconds, CPU seconds, peak pool bytes). Also used by the bound's test."""
    done = subprocess.run([sys.executable, "-c", UPLOAD, str(directory), uri, mode, str(chunk_bytes)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"{mode} upload failed:\n{done.stderr[-2000:]}")
    wall, cpu, peak = done.stdout.split()[-3:]
    return float(wall), float(cpu), int(peak)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=64, help="size of the checkpoint file")
    parser.add_argument("--cap-mb-per-s", type=float, default=25.0, help="per-connection upload cap; 0: none")
    parser.add_argument("--rounds", type=int, default=2, help="alternating bounded / parallel uploads")
    args = parser.parse_args()

    from infra.fault_proxy import FaultProxy
    from infra.s3_endpoint import pointed_at, start_moto_server
    from workers import storage

    work = Path(tempfile.mkdtemp(prefix="gptctl-bench-upload-"))
    checkpoint = work / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(os.urandom(args.size_mb << 20))
    results: dict[str, list[tuple[float, float, int]]] = {"bounded": [], "parallel": []}
    with start_moto_server(log_path=work / "moto.log") as s3:
        with pointed_at(s3.url):
            storage.ensure_bucket("s3://bench-upload")
        proxy = FaultProxy(s3.url, upload_bytes_per_s=args.cap_mb_per_s * 1e6) if args.cap_mb_per_s else None
        try:
            with pointed_at(proxy.url if proxy else s3.url):
                for round_index in range(args.rounds):
                    for mode in results:
                        results[mode].append(upload_once(checkpoint, f"s3://bench-upload/{mode}-{round_index}", mode))
                        wall, cpu, peak = results[mode][-1]
                        print(f"round {round_index + 1} {mode:8s}: {wall:5.2f} s, CPU {cpu:.3f} s, "
                              f"peak {peak / 2**20:.0f} MB", flush=True)
        finally:
            if proxy:
                proxy.stop()

    def median(mode: str, index: int) -> float:
        return statistics.median(r[index] for r in results[mode])

    bounded_s, parallel_s = median("bounded", 0), median("parallel", 0)
    bounded_cpu, parallel_cpu = median("bounded", 1), median("parallel", 1)
    bounded_mb, parallel_mb = median("bounded", 2) / 2**20, median("parallel", 2) / 2**20
    link = f"{args.cap_mb_per_s:g} MB/s per connection" if args.cap_mb_per_s else "uncapped loopback"
    print(f"{args.size_mb} MB file, {link}, median of {args.rounds}: bounded {bounded_s:.2f} s / "
          f"{bounded_cpu:.3f} s CPU / {bounded_mb:.0f} MB; parallel {parallel_s:.2f} s / {parallel_cpu:.3f} s CPU / "
          f"{parallel_mb:.0f} MB; bounded / parallel: time {bounded_s / parallel_s:.2f}x, "
          f"CPU {bounded_cpu / parallel_cpu:.2f}x, memory {bounded_mb / parallel_mb:.2f}x")
    print(json.dumps({"bench": "checkpoint_upload", "size_mb": args.size_mb, "cap_mb_per_s": args.cap_mb_per_s,
                      "bounded_s": round(bounded_s, 2), "parallel_s": round(parallel_s, 2),
                      "bounded_cpu_s": round(bounded_cpu, 3), "parallel_cpu_s": round(parallel_cpu, 3),
                      "bounded_peak_mb": round(bounded_mb), "parallel_peak_mb": round(parallel_mb),
                      "time_ratio": round(bounded_s / parallel_s, 2), "memory_ratio": round(bounded_mb / parallel_mb, 2)}))


if __name__ == "__main__":
    main()
