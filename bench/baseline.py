"""The bare PyTorch training loop every training benchmark compares gptctl against.

Kept in one place so the CPU overhead bench and the GPU bench measure the same baseline:
one process, no DeepSpeed, fused AdamW (as the worker uses), gradient clipping, bf16 via autocast on
fp32 weights where asked (the usual nanoGPT-style mixed precision).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence

import torch


def bare_loop(model_config, batches: Sequence, steps: int, lr: float, skip: int, device: str = "cpu",
              precision: str = "fp32", compile: bool = False, grad_accum: int = 1) -> float:
    """Median tokens/s over `steps` optimizer steps (each of `grad_accum` micro-batches) after `skip` warm-up steps."""
    from model import GPT

    torch.manual_seed(0)
    model = GPT(model_config).to(device)
    on_cuda = torch.device(device).type == "cuda"
    optimizer = torch.optim.AdamW(model.configure_param_groups(0.1), lr=lr, betas=(0.9, 0.95), fused=True)
    forward = torch.compile(model) if compile else model
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    rates = []
    for step in range(steps):
        if on_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        tokens = 0
        for micro in range(grad_accum):
            batch = batches[(step * grad_accum + micro) % len(batches)]
            idx = batch.input_ids.to(device, non_blocking=True)
            targets = batch.targets.to(device, non_blocking=True)
            with autocast:
                _, loss = forward(idx, targets)
            (loss / grad_accum).backward()
            tokens += idx.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # one sync per step, like the worker loop
        rates.append(tokens / (time.perf_counter() - started))
    del model, optimizer, forward
    if on_cuda:
        torch.cuda.empty_cache()
    return statistics.median(rates[skip:])
