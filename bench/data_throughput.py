"""Data-plane throughput: what one loader delivers vs what one training step consumes.

In one run, on this machine:

* ``s3``: tokens/s one global loader (rank 0 of 1, ``train_batches_global``) delivers from a
  loopback S3 endpoint (moto_server, started here and stopped at the end), shards verified;
* ``local``: the same from local disk;
* ``train``: tokens/s a plain single-process torch step consumes (forward + backward + AdamW)
  on the benchmark model (GPT 4 layers x 256, 4 heads, seq 256, batch 8, vocab 8192), fed by
  the local loader;
* ``ratio_s3_to_train`` = s3 / train: how many such training processes one loader could feed.

Tokens are counted as ``batch * seq_len`` (the inputs a step trains on). Ends with one JSON
line ``{"bench": "data_throughput", ...}``. Usage::

    .venv/bin/python bench/data_throughput.py [--rows 49152] [--train-steps 6] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers import storage  # noqa: E402
from workers.data import DataStats, train_batches, train_batches_global  # noqa: E402
from workers.shards import MANIFEST_NAME, Manifest, ShardWriter, load_manifest  # noqa: E402

SEQ_LEN = 256
BATCH = 8
VOCAB = 8192


def build_dataset(out: str, rows: int, rows_per_shard: int, rows_per_member: int, seed: int = 0) -> Manifest:
    """Random uint16 token rows written as real shards + manifest (no tokenizer needed)."""
    rng = np.random.default_rng(seed)
    manifest = Manifest(kind="pretrain", tokenizer_sha256="bench", vocab_size=VOCAB, eos_id=0, pad_id=0,
                        seq_len=SEQ_LEN, dtype="uint16", rows_per_member=rows_per_member, seed=seed)
    for split, n in (("train", rows), ("val", rows_per_member)):
        with ShardWriter(out, split, seq_len=SEQ_LEN, dtype="uint16", rows_per_shard=rows_per_shard,
                         rows_per_member=rows_per_member) as writer:
            for start in range(0, n, 8192):
                writer.write(rng.integers(0, VOCAB, size=(min(8192, n - start), SEQ_LEN + 1), dtype=np.uint16))
        manifest.splits[split] = writer.close()
    storage.write_text(storage.join(out, MANIFEST_NAME), manifest.to_json())
    return manifest


def loader_rate(data_uri: str, batches: int, *, world_size: int = 1, legacy: bool = False) -> dict:
    """Tokens/s of rank 0's loader over ``batches`` batches (all ranks' loaders when world_size > 1)."""
    stats = DataStats()
    started = time.perf_counter()
    if legacy:
        names = load_manifest(data_uri).shard_names("train")
        loaders = [train_batches(data_uri, names, BATCH, seed=1, stats=stats)]
    else:
        loaders = [train_batches_global(data_uri, r, world_size, BATCH, seed=1, stats=stats) for r in range(world_size)]
    tokens = 0
    for _ in range(batches):
        for loader in loaders:
            b = next(loader)
            tokens += b.input_ids.numel()
    elapsed = time.perf_counter() - started
    for loader in loaders:
        loader.close()
    return {"tokens_per_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens,
            "mb_read": stats.bytes_read / 1e6, "shards_verified": stats.shards_verified}


def train_rate(data_uri: str, steps: int, threads: int | None) -> dict:
    import torch

    from model import GPT, GPTConfig

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ_LEN, n_layer=4, n_head=4, n_embd=256))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    loader = train_batches_global(data_uri, 0, 1, BATCH, seed=2)

    waited = [0.0]

    def step() -> int:
        t0 = time.perf_counter()
        b = next(loader)
        waited[0] += time.perf_counter() - t0
        _, loss = model(b.input_ids, b.targets, b.loss_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return b.input_ids.numel()

    for _ in range(2):  # warm-up
        step()
    waited[0] = 0.0
    started = time.perf_counter()
    tokens = sum(step() for _ in range(steps))
    elapsed = time.perf_counter() - started
    loader.close()
    return {"tokens_per_s": tokens / elapsed, "seconds": elapsed, "step_s": elapsed / steps, "data_wait_s": waited[0],
            "params_m": model.num_parameters() / 1e6, "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=49152, help="train rows of seq_len+1 tokens (default ~12.6 M tokens)")
    parser.add_argument("--rows-per-shard", type=int, default=4096)
    parser.add_argument("--rows-per-member", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the training step")
    args = parser.parse_args(argv)

    from infra.s3_endpoint import pointed_at, start_moto_server

    work = Path(tempfile.mkdtemp(prefix="gptctl-bench-data-"))
    local = str(work / "ds")
    print(f"[bench] {platform.node()}: {os.cpu_count()} CPUs, python {platform.python_version()}", flush=True)
    t = time.perf_counter()
    manifest = build_dataset(local, args.rows, args.rows_per_shard, args.rows_per_member)
    n_shards = len(manifest.splits["train"])
    print(f"[bench] dataset: {args.rows} rows x {SEQ_LEN + 1} tokens in {n_shards} shards "
          f"({sum((work / 'ds' / s.name).stat().st_size for s in manifest.splits['train']) / 1e6:.1f} MB) "
          f"in {time.perf_counter() - t:.1f} s", flush=True)
    batches = 2 * args.rows // BATCH  # two epochs

    with start_moto_server(log_path=work / "moto.log") as handle, pointed_at(handle.url):
        uri = "s3://gptctl-bench/ds"
        storage.ensure_bucket(uri)
        storage.upload_dir(local, uri)
        s3 = loader_rate(uri, batches)
        print(f"[bench] loader from loopback S3 ({handle.url}): {s3['tokens_per_s'] / 1e6:.2f} M tokens/s "
              f"({s3['tokens'] / 1e6:.1f} M tokens, {s3['mb_read']:.0f} MB read, {s3['shards_verified']} shards verified, "
              f"{s3['seconds']:.2f} s)", flush=True)
        s3_two = loader_rate(uri, batches // 2, world_size=2)
        print(f"[bench] 2 rank loaders in one process from S3: {s3_two['tokens_per_s'] / 1e6:.2f} M tokens/s together "
              f"({s3_two['mb_read']:.0f} MB read for {s3_two['tokens'] / 1e6:.1f} M tokens)", flush=True)

    disk = loader_rate(local, batches)
    print(f"[bench] loader from local disk: {disk['tokens_per_s'] / 1e6:.2f} M tokens/s ({disk['seconds']:.2f} s)", flush=True)
    legacy = loader_rate(local, batches, legacy=True)
    print(f"[bench] per-rank loader (train_batches) from local disk: {legacy['tokens_per_s'] / 1e6:.2f} M tokens/s", flush=True)
    train = train_rate(local, args.train_steps, args.threads)
    print(f"[bench] training step (GPT 4x256, {train['params_m']:.1f} M params, seq {SEQ_LEN}, batch {BATCH}, "
          f"{train['torch_threads']} torch threads): {train['tokens_per_s']:,.0f} tokens/s ({train['step_s']:.2f} s/step, "
          f"{1e3 * train['data_wait_s'] / args.train_steps:.2f} ms/step waiting for data)",
          flush=True)
    result = {
        "bench": "data_throughput",
        "s3_tokens_per_s": round(s3["tokens_per_s"]),
        "local_tokens_per_s": round(disk["tokens_per_s"]),
        "train_tokens_per_s": round(train["tokens_per_s"]),
        "train_data_wait_ms_per_step": round(1e3 * train["data_wait_s"] / args.train_steps, 3),
        "ratio_s3_to_train": round(s3["tokens_per_s"] / train["tokens_per_s"], 1),
        "legacy_local_tokens_per_s": round(legacy["tokens_per_s"]),
        "s3_two_ranks_tokens_per_s": round(s3_two["tokens_per_s"]),
        "rows": args.rows,
        "rows_per_member": args.rows_per_member,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
