"""The same fine-tune, full vs LoRA, in one run: tokens/s, peak memory, checkpoint bytes, held-out loss.

A small GPT is pre-trained on the demo corpus, then fine-tuned on its QA pairs twice from that
checkpoint: every weight (train.lora unset), and LoRA adapters (train.lora defaults). Each phase
runs the gptctl worker loop (workers/train_loop.run_worker, DeepSpeed ZeRO, no Ray) in its own
process, so peak memory (CUDA max allocated, or peak RSS on CPU) is that phase's alone.
tokens/s is the median optimizer step after --warmup steps. Checkpoint bytes: the whole final
checkpoint directory (DeepSpeed resume state included). em_full / em_lora: exact match of greedy
answers to the held-out QA pairs (workers/task_eval.py), from the final weights (LoRA: merged).

The defaults are the demo's task and recipe (orchestrator/cli/demo.py: 60 people, pre-trained 500 steps,
fine-tuned 60, the demo's global batch) on a 4x256 GPT: at the demo's 4x128 the checkpoint's fixed
files (tokenizer, config, state) weigh as much as the adapter. LoRA gets its own learning
rate (--lora-lr, 10x the full fine-tune's), as adapters starting at zero usually need.

    python bench/finetune_lora.py [--steps 60] [--n-layer 4] [--n-embd 256]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _child(args: argparse.Namespace) -> None:
    """One phase (pretrain | full | lora) in this process; prints one JSON line."""
    from orchestrator.ray_runtime import default_extensions_dir
    from workers import train_loop
    from workers.engine import ensure_single_process_env
    from workers.metrics import peak_memory_gb
    from workers.shards import load_manifest

    import socket

    default_extensions_dir()
    with socket.socket() as probe:  # not ensure_single_process_env's fixed port: another job may hold it
        probe.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(probe.getsockname()[1]))
    ensure_single_process_env()
    step_s: list[float] = []
    timed = train_loop.optimizer_step

    def optimizer_step(*a, **k):  # the loop's own step, timed
        started = time.perf_counter()
        loss = timed(*a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - started)
        return loss

    train_loop.optimizer_step = optimizer_step
    pretrain = args.child == "pretrain"
    lr = {"pretrain": 3e-3, "full": args.lr, "lora": args.lora_lr}[args.child]
    data = Path(args.workdir, "pretrain_data" if pretrain else "qa_data")
    manifest = load_manifest(str(data))
    train = {"max_steps": args.pretrain_steps if pretrain else args.steps, "micro_batch_size": args.batch,
             "lr": lr, "min_lr": lr / 10, "warmup_steps": 10 if pretrain else 5,
             "weight_decay": 0.0, "zero_stage": args.zero_stage, "eval_every": 10**6, "eval_batches": 4,
             "checkpoint_every": 10**6, "samples_at_eval": 0,
             "precision": "bf16" if torch.cuda.is_available() else "fp32"}
    if args.child == "lora":
        train["lora"] = {}
    from model import config_from_preset

    config = config_from_preset("tiny", vocab_size=manifest.vocab_size, block_size=manifest.seq_len,
                                n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    out = Path(args.workdir, args.child)
    job = train_loop.WorkerJob(job_name=args.child, kind="pretrain" if pretrain else "finetune", data_uri=str(data),
                               train=train, model_config=config.to_dict(), val_shards=manifest.shard_names("val"),
                               init_from=None if pretrain else str(Path(args.workdir, "pretrain", "final")))
    hooks = train_loop.LocalHooks(str(out))
    train_loop.run_worker(job, hooks)
    final = sorted(out.glob("step_*"))[-1]
    final.rename(out / "final")
    tokens_per_step = args.batch * manifest.seq_len
    exact_match = None if pretrain else _held_out_exact_match(args, out / "final")
    print(json.dumps({
        "phase": args.child, "tokens_per_s": tokens_per_step / statistics.median(step_s[args.warmup:]),
        "peak_mem_gb": peak_memory_gb(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "ckpt_bytes": _dir_bytes(out / "final"),
        "heldout_loss": next((r["val/loss"] for r in reversed(hooks.reports) if "val/loss" in r), None),
        "exact_match": exact_match,
    }))


def _held_out_exact_match(args: argparse.Namespace, checkpoint: Path) -> float:
    """Greedy answers of the final weights to the held-out QA pairs, scored as task eval does."""
    from model import GPTTokenizer, load_pretrained
    from model.lora import load_merged
    from orchestrator.data.prepare import PROMPT_TEMPLATE
    from workers.eval_set import read_eval_set
    from workers.task_eval import evaluate_pairs

    base = Path(args.workdir, "pretrain", "final")
    model = load_merged(base, checkpoint) if args.child == "lora" else load_pretrained(checkpoint)
    tokenizer = GPTTokenizer.load(checkpoint / "tokenizer.json")
    pairs = read_eval_set(str(Path(args.workdir, "corpus", "qa_val.jsonl")))
    return evaluate_pairs(model.eval(), tokenizer, pairs, PROMPT_TEMPLATE, max_new_tokens=24).exact_match


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps per phase")
    parser.add_argument("--pretrain-steps", type=int, default=500)
    parser.add_argument("--people", type=int, default=60, help="people in the synthetic QA corpus")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4, help="full fine-tune learning rate")
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--child", choices=("pretrain", "full", "lora"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    from orchestrator.data.corpus import write_demo_corpus
    from orchestrator.data.prepare import prepare_dataset

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with tempfile.TemporaryDirectory(prefix="gptctl-bench-lora-") as workdir:
        root = Path(workdir)
        corpus = write_demo_corpus(root / "corpus", n_people=args.people, seed=0)
        prepare_dataset([str(corpus["pretrain"])], str(root / "pretrain_data"), vocab_size=1024, seq_len=64,
                        rows_per_shard=256, progress=False)
        phases: dict[str, dict] = {}
        for phase in ("pretrain", "full", "lora"):
            if phase == "full":  # QA shards need the base's tokenizer, which the pretrain phase wrote
                prepare_dataset([str(corpus["qa_train"])], str(root / "qa_data"), seq_len=64,
                                tokenizer=str(root / "pretrain" / "final"), val_inputs=[str(corpus["qa_val"])],
                                rows_per_shard=256, progress=False)
            command = [sys.executable, __file__, "--child", phase, "--workdir", workdir,
                       *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                         if k not in ("child", "workdir")]]
            result = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith('{"phase"')]
            if result.returncode != 0 or not lines:
                sys.exit(f"{phase} phase failed:\n{result.stderr[-4000:]}")
            phases[phase] = json.loads(lines[-1])
            print(f"[bench] {phase}: {phases[phase]}", flush=True)
    full, lora = phases["full"], phases["lora"]
    print(json.dumps({
        "bench": "finetune_lora", "steps": args.steps, "n_layer": args.n_layer, "n_embd": args.n_embd,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "lora_ckpt_ratio": lora["ckpt_bytes"] / full["ckpt_bytes"],
        "lora_speed_ratio": lora["tokens_per_s"] / full["tokens_per_s"],
        "lora_mem_ratio": lora["peak_mem_gb"] / full["peak_mem_gb"],
        "heldout_loss_full": full["heldout_loss"], "heldout_loss_lora": lora["heldout_loss"],
        "tokens_per_s_full": full["tokens_per_s"], "tokens_per_s_lora": lora["tokens_per_s"],
        "ckpt_bytes_full": full["ckpt_bytes"], "ckpt_bytes_lora": lora["ckpt_bytes"],
        "em_full": full["exact_match"], "em_lora": lora["exact_match"],
    }))


if __name__ == "__main__":
    main()
