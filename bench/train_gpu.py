"""GPU training throughput and MFU of the gptctl worker step (DeepSpeed, no Ray).

GPT-2 124M, sequence 1024, bf16 by default: the same `build_engine` + `optimizer_step` the
Ray workers run, on synthetic tokens (data loading is measured by bench/data_throughput.py).
The baseline, measured in the same run on the same batches, is bench/baseline.py's bare
PyTorch loop (fused AdamW, bf16 autocast, compiled when --compile is given).
On a machine without a GPU it runs a tiny preset on the CPU so the script stays exercised.

    python bench/train_gpu.py [--preset gpt2] [--batch 16] [--steps 30] [--compile] [--no-baseline]
                              [--sdpa cudnn] [--profile kernels.txt]

--sdpa pins the attention kernel (both loops) to see whether one beats PyTorch's own choice;
--profile times 3 more steps under torch.profiler and writes the kernels that took the most
device time, so a GPU session tells where a step goes, not only how long it takes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.baseline import bare_loop  # noqa: E402
from model.attention import attention_kernel  # noqa: E402
from workers.train_spec import AttentionKernel  # noqa: E402


def synthetic_batches(vocab: int, batch: int, seq_len: int):
    from workers.data import Batch

    generator = torch.Generator().manual_seed(0)
    while True:
        rows = torch.randint(0, vocab, (batch, seq_len + 1), generator=generator)
        yield Batch(input_ids=rows[:, :-1].contiguous(), targets=rows[:, 1:].contiguous(), loss_mask=None)


def write_kernel_profile(path: str, run_step, gpu: bool, steps: int = 3) -> None:
    """The operators that took the most device time over `steps` steps (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            run_step()
        if gpu:
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    Path(path).write_text(profiler.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=90))
    print(f"kernel profile of {steps} steps → {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default=None, help="default: gpt2 on GPU, tiny on CPU")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-baseline", action="store_true", help="skip the bare PyTorch loop")
    parser.add_argument("--deepspeed", type=json.loads, default={}, metavar="JSON",
                        help="extra DeepSpeed config (the spec's train.deepspeed), e.g. '{\"torch_autocast\": ...}'")
    parser.add_argument("--sdpa", default="auto", choices=get_args(AttentionKernel),
                        help="attention kernel for both loops, as train.attention_kernel (default: PyTorch's choice)")
    parser.add_argument("--profile", default=None, metavar="PATH", help="write a kernel profile of 3 more steps")
    args = parser.parse_args()
    with attention_kernel(args.sdpa):
        run(args)


def run(args: argparse.Namespace) -> None:

    from orchestrator.ray_runtime import default_extensions_dir

    default_extensions_dir()
    from model import GPT, config_from_preset
    from model.config import flops_per_token
    from workers.train_spec import TrainSpec
    from workers.engine import build_engine, ensure_single_process_env
    from workers.metrics import mfu, peak_flops, peak_memory_gb
    from workers.train_loop import optimizer_step

    gpu = torch.cuda.is_available()
    preset = args.preset or ("gpt2" if gpu else "tiny")
    seq_len = args.seq_len or (1024 if gpu else 128)
    batch = args.batch or (16 if gpu else 8)
    precision = args.precision or ("bf16" if gpu else "fp32")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    ensure_single_process_env()
    torch.manual_seed(0)
    config = config_from_preset(preset, vocab_size=50304, block_size=seq_len)
    train = TrainSpec(micro_batch_size=batch, grad_accum_steps=args.grad_accum, precision=precision,
                      zero_stage=args.zero_stage, compile=args.compile, lr=6e-4, min_lr=6e-5, warmup_steps=0,
                      attention_kernel=args.sdpa, deepspeed=args.deepspeed)
    stream = synthetic_batches(config.vocab_size, batch, seq_len)
    bare_rate = None
    if not args.no_baseline:
        batches = [next(stream) for _ in range(4)]
        bare_rate = bare_loop(config, batches, args.steps, 6e-4, args.warmup, device="cuda" if gpu else "cpu",
                              precision=precision, compile=args.compile, grad_accum=args.grad_accum)
        print(f"bare PyTorch loop: {bare_rate:,.0f} tokens/s", flush=True)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    engine, optimizer = build_engine(GPT(config), train)
    device = engine.device
    tokens_per_step = batch * args.grad_accum * seq_len
    timings = []
    for step in range(args.steps):
        if gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        optimizer_step(engine, optimizer, stream, args.grad_accum, 6e-4)  # returns a synced float
        timings.append(time.perf_counter() - started)
    if args.profile:
        write_kernel_profile(args.profile, lambda: optimizer_step(engine, optimizer, stream, args.grad_accum, 6e-4), gpu)
    steady = sorted(timings[args.warmup:])
    step_s = steady[len(steady) // 2]
    tokens_per_s = tokens_per_step / step_s
    flops = flops_per_token(config, seq_len)
    autocast = args.deepspeed.get("torch_autocast", {}).get("enabled", False)  # fp32 weights, bf16 matmuls
    utilisation = mfu(flops, tokens_per_s, peak_flops(device, "bf16" if autocast else precision))
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    print(f"device {name}; {preset} ({sum(p.numel() for p in engine.module.parameters()) / 1e6:.1f} M params), "
          f"seq {seq_len}, batch {batch}x{args.grad_accum}, {precision}, ZeRO-{args.zero_stage}"
          f"{', compiled' if args.compile else ''}{f', deepspeed {json.dumps(args.deepspeed)}' if args.deepspeed else ''}"
          f", attention {args.sdpa}")
    print(f"median step {step_s * 1000:.1f} ms → {tokens_per_s:,.0f} tokens/s; "
          f"MFU {'n/a' if utilisation is None else f'{utilisation:.1%}'}; peak memory {peak_memory_gb(device):.1f} GB")
    ratio = None if bare_rate is None else tokens_per_s / bare_rate
    if ratio is not None:
        print(f"gptctl worker step / bare PyTorch loop: {ratio:.3f}")
    print(json.dumps({"bench": "train_gpu", "device": name, "preset": preset, "seq_len": seq_len, "batch": batch,
                      "precision": precision, "zero_stage": args.zero_stage, "compile": args.compile,
                      "grad_accum": args.grad_accum, "deepspeed": args.deepspeed, "sdpa": args.sdpa,
                      "tokens_per_s": round(tokens_per_s),
                      "mfu": None if utilisation is None else round(utilisation, 4),
                      "step_ms": round(step_s * 1000, 2),
                      "bare_tokens_per_s": None if bare_rate is None else round(bare_rate),
                      "ratio_bare": None if ratio is None else round(ratio, 3),
                      "peak_memory_gb": round(peak_memory_gb(device), 2)}))


if __name__ == "__main__":
    main()
