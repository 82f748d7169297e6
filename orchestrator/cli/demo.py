"""The demo: the whole path on the embedded defaults, with no network.

corpus → tokenizer + shards → pre-train (2 workers, ZeRO-2) → fine-tune (QA) →
Ray Serve → one completion over HTTP. Everything it starts, it stops.
"""
from __future__ import annotations

import time
from pathlib import Path

from orchestrator.data.corpus import write_demo_corpus
from orchestrator.data.prepare import prepare_dataset
from orchestrator.jobs.controller import prepare_job, run_training
from orchestrator.runs import resolve_tracking_uri
from orchestrator.serve.deploy import deploy, query
from orchestrator.spec import parse_spec

DEMO_MODEL = {"preset": "tiny", "n_layer": 4, "n_head": 4, "n_embd": 128}
# 60 people (240 facts): 500 steps of a 4-layer model learn most of their facts; 200 people
# were too many to learn in the demo's time, so held-out answers were mostly guesses (EM ~0.1)
DEMO_PEOPLE = 60
HELD_OUT_TEXT = ("one question per person that fine-tuning never asks; its answer is a fact stated only in the "
                 "pre-training text")


def _first_and_last(tracking_uri: str, run_id: str, key: str) -> tuple[float, float]:
    """A metric at step 0 (the pre-trained weights, before fine-tuning) and at the last step."""
    from mlflow.tracking import MlflowClient

    history = sorted(MlflowClient(tracking_uri).get_metric_history(run_id, key), key=lambda m: m.step)
    return history[0].value, history[-1].value


def _delete_app(name: str) -> None:
    """Stop the demo's own Serve app, if it started, before Ray goes.

    Not serve.shutdown(): on a Ray joined through RAY_ADDRESS that would stop every app there,
    and on the embedded Ray it kills Serve's controller while its graceful-shutdown call is
    still queued, which the raylet then logs as a failed task."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.delete(name)
    except RayServeException:  # Serve never started: the deploy failed before it
        pass


def run_demo(workdir: str | Path = "demo_output", port: int = 8000, pretrain_steps: int = 500,
             finetune_steps: int = 60, n_people: int = DEMO_PEOPLE) -> dict:
    import ray

    started = time.monotonic()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = resolve_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")

    print("[demo] 1/6 writing a synthetic corpus", flush=True)
    corpus = write_demo_corpus(workdir / "corpus", n_people=n_people)
    print("[demo] 2/6 training a byte-level BPE tokenizer and packing shards", flush=True)
    pretrain_data = str(workdir / "shards" / "pretrain")
    prepare_dataset([str(corpus["pretrain"])], pretrain_data, vocab_size=1024, seq_len=64,
                    rows_per_shard=512, seed=0)

    common = {"storage_path": str(workdir / "runs"), "tracking": {"uri": tracking_uri, "experiment": "gptctl-demo"},
              "cluster": {"num_workers": 2}}
    print("[demo] 3/6 pre-training: 2 Ray Train workers, DeepSpeed ZeRO-2", flush=True)
    pretrain = parse_spec({
        "kind": "pretrain", "name": "demo-pretrain", "data": pretrain_data, "model": DEMO_MODEL,
        "train": {"max_steps": pretrain_steps, "micro_batch_size": 16, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 20, "eval_every": 100, "checkpoint_every": 200, "zero_stage": 2},
        **common,
    })
    pretrained = run_training(prepare_job(pretrain))

    print("[demo] 4/6 fine-tuning on question/answer pairs (loss on answers only)", flush=True)
    finetune_data = str(workdir / "shards" / "qa")
    prepare_dataset([str(corpus["qa_train"])], finetune_data, seq_len=64, tokenizer=pretrained.checkpoint,
                    val_fraction=0.0, rows_per_shard=256, seed=0, val_inputs=[str(corpus["qa_val"])])
    finetune = parse_spec({
        "kind": "finetune", "name": "demo-finetune", "init_from": pretrained.checkpoint, "data": finetune_data,
        "eval_set": {"path": str(corpus["qa_val"]), "max_new_tokens": 24},  # held-out EM at every eval
        # gently: at lr 1e-3 for 100 steps it learned the QA format but overwrote facts (held-out EM 0.43
        # against 0.80 here, in a plain-torch probe of the same task)
        "train": {"max_steps": finetune_steps, "micro_batch_size": 16, "lr": 3e-4, "min_lr": 3e-5,
                  "warmup_steps": 10, "eval_every": 30, "checkpoint_every": 30},
        **common,
    })
    finetuned = run_training(prepare_job(finetune))
    before, after = _first_and_last(tracking_uri, finetuned.run_id, "val/loss")
    em_before, em_after = _first_and_last(tracking_uri, finetuned.run_id, "eval/exact_match")

    print("[demo] 5/6 deploying the fine-tuned checkpoint to Ray Serve", flush=True)
    try:
        url = deploy(parse_spec({"kind": "deploy", "name": "demo", "checkpoint": finetuned.checkpoint, "port": port}))
        print("[demo] 6/6 asking it a question over HTTP", flush=True)
        question, expected = _held_out_example(corpus["qa_val"])
        reply = query(url, question, max_tokens=24, temperature=0.0)
    finally:
        _delete_app("demo")
        ray.shutdown()

    print("\n========== gptctl demo ==========")
    print(f"pre-train run : {pretrained.run_id}  (checkpoint {pretrained.checkpoint})")
    print(f"fine-tune run : {finetuned.run_id}  (checkpoint {finetuned.checkpoint})")
    print(f"held-out QA loss before fine-tuning: {before:.3f}   after: {after:.3f}")
    print(f"held-out QA exact match before fine-tuning: {em_before:.2f}   after: {em_after:.2f}  "
          f"(greedy answers to {HELD_OUT_TEXT})")
    print(f"POST {url}/generate  prompt: {question!r}")
    print(f"completion    : {reply['text']!r}")
    print(f"held-out truth: {expected!r}")
    print(f"MLflow UI     : mlflow ui --backend-store-uri {tracking_uri} --port 5000  → http://127.0.0.1:5000")
    print(f"took {time.monotonic() - started:.0f} s")
    return {"pretrain_run": pretrained.run_id, "finetune_run": finetuned.run_id, "val_before": before,
            "val_after": after, "em_before": em_before, "em_after": em_after, "completion": reply["text"]}


def _held_out_example(qa_path: Path) -> tuple[str, str]:
    """A question the fine-tune never trained on, with its true answer."""
    import json

    record = json.loads(Path(qa_path).read_text().splitlines()[0])
    return record["prompt"], record["response"]
