"""Greedy decoding speed: gptctl's KV-cache `generate` vs transformers' `generate`, same weights.

A random GPT (default 6 layers, n_embd 384, vocab 8192) is saved as a gptctl checkpoint and
exported with `gptctl export --format hf`; gptctl loads the checkpoint, transformers loads the
export (offline). Both decode the same prompt greedily for the same number of new tokens with
the same torch thread count, one timed run each after one short warm-up each. Prints figures
and ends with one JSON line {"bench": "generate_vs_hf", ...}.

    .venv/bin/python bench/generate_vs_hf.py [--layers 6 --embd 384 --new-tokens 256 --threads N]
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model import (GPT, GPTConfig, GPTTokenizer, SamplingParams, generate, load_pretrained, save_pretrained,
                   use_decode_layout)  # noqa: E402
from orchestrator.registry.export import export_hf  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--embd", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per side, alternating; the fastest counts (default: one run)")
    return p.parse_args()


def _make_checkpoint(directory: Path, args: argparse.Namespace) -> None:
    corpus = [f"sample {i} of the benchmark corpus, words words words {i * 7}" for i in range(200)]
    tokenizer = GPTTokenizer.train(corpus, vocab_size=512)
    config = GPTConfig(vocab_size=args.vocab, block_size=args.block_size, n_layer=args.layers,
                       n_head=args.heads, n_embd=args.embd)
    torch.manual_seed(args.seed)
    save_pretrained(directory, GPT(config), config, tokenizer)


def _time(fn) -> tuple[float, float, list[int]]:
    """(wall s, process CPU s, tokens): CPU time shows the work when other jobs share the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, tokens


def main() -> int:
    args = _args()
    torch.set_num_threads(args.threads)
    import transformers

    with tempfile.TemporaryDirectory(prefix="gptctl-bench-") as tmp:
        ckpt, hf_dir = Path(tmp, "ckpt"), Path(tmp, "hf")
        _make_checkpoint(ckpt, args)
        export_hf(str(ckpt), str(hf_dir))
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        ours = use_decode_layout(load_pretrained(ckpt).to(args.device, dtype))  # as serving loads it
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True).eval()
        hf = hf.to(args.device, dtype)

    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, 512, (args.prompt_tokens,), generator=g).tolist()
    n = args.new_tokens

    def run_ours(count: int) -> list[int]:
        return generate(ours, prompt, SamplingParams(max_new_tokens=count, temperature=0.0))

    def run_hf(count: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt], device=args.device), max_new_tokens=count, min_new_tokens=count, do_sample=False,
                              use_cache=True, eos_token_id=None, pad_token_id=hf.config.pad_token_id)
        return out[0, len(prompt):].tolist()

    run_ours(8), run_hf(8)  # warm-up: allocator, kernels, lazy imports
    ours_runs, hf_runs = [], []
    for i in range(max(1, args.repeats)):
        pair = [(ours_runs, lambda: run_ours(n)), (hf_runs, lambda: run_hf(n))]
        for runs, fn in pair if i % 2 == 0 else pair[::-1]:
            runs.append(_time(fn))
    ours_s, ours_cpu, ours_tokens = min(ours_runs)
    hf_s, hf_cpu, hf_tokens = min(hf_runs)
    same = next((i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens)) if a != b), min(len(ours_tokens), len(hf_tokens)))

    ours_tps, hf_tps = len(ours_tokens) / ours_s, len(hf_tokens) / hf_s
    params = ours.num_parameters()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, {device_name}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()}")
    print(f"model: {args.layers} layers, n_embd {args.embd}, {args.heads} heads, vocab {args.vocab}, "
          f"{params / 1e6:.1f}M params; prompt {len(prompt)} tokens, {n} new tokens, greedy, {args.dtype}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the end: {load:.1f} (figures are only comparable on an otherwise idle machine)")
    print(f"gptctl generate (KV cache):         {ours_s:7.3f} s  {ours_tps:8.1f} tokens/s  "
          f"({ours_cpu / len(ours_tokens) * 1e3:.2f} CPU-ms/token)")
    print(f"transformers generate (use_cache):  {hf_s:7.3f} s  {hf_tps:8.1f} tokens/s  "
          f"({hf_cpu / len(hf_tokens) * 1e3:.2f} CPU-ms/token)")
    print(f"ratio gptctl/transformers: {ours_tps / hf_tps:.2f}x; identical greedy tokens: {same}/{n}")
    print(json.dumps({"bench": "generate_vs_hf", "gptctl_tokens_per_s": round(ours_tps, 2),
                      "hf_tokens_per_s": round(hf_tps, 2), "ratio": round(ours_tps / hf_tps, 3),
                      "cpu_ratio": round((hf_cpu / len(hf_tokens)) / (ours_cpu / len(ours_tokens)), 3),
                      "new_tokens": n, "threads": torch.get_num_threads(), "identical_tokens": same,
                      "n_layer": args.layers, "n_embd": args.embd, "vocab_size": args.vocab,
                      "device": device_name, "dtype": args.dtype}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
