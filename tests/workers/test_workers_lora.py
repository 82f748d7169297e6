"""A LoRA fine-tune through Ray Train + DeepSpeed ZeRO-3 on two workers: adapter-only
checkpoints, crash-resume continuing bit-identically, and the merged model in the registry, in
`gptctl export --merge` and in what a Serve replica loads.

Tiny GPT, local storage, a sqlite MLflow store: real DeepSpeed, real Ray, real MLflow.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from model import GPT, GPTConfig, GPTTokenizer, load_pretrained, save_pretrained
from model.lora import load_with_adapter
from orchestrator.data.corpus import write_demo_corpus
from orchestrator.data.prepare import prepare_dataset
from orchestrator.jobs.controller import prepare_job, run_training
from orchestrator.spec import parse_spec

pytestmark = pytest.mark.integration
RUNS: dict = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A random tiny base checkpoint and prompt/response shards tokenized with its tokenizer."""
    root = tmp_path_factory.mktemp("lora")
    corpus = write_demo_corpus(root / "corpus", n_people=20, seed=4)
    texts = [path.read_text() for path in sorted(corpus["pretrain"].glob("*.txt"))]
    tokenizer = GPTTokenizer.train(texts, vocab_size=300)
    config = GPTConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(5)
    save_pretrained(root / "base", GPT(config), config, tokenizer)
    prepare_dataset([str(corpus["qa_train"])], str(root / "data"), seq_len=32, tokenizer=str(root / "base"),
                    val_inputs=[str(corpus["qa_val"])], rows_per_shard=64, progress=False)
    return root


def _spec(workdir: Path, name: str) -> dict:
    return {
        "kind": "finetune", "name": name, "init_from": str(workdir / "base"), "data": str(workdir / "data"),
        "storage_path": str(workdir / "runs"),
        # one eval batch for two ZeRO-3 ranks: the idle rank must still join every forward pass;
        # task eval generates from the gathered weights with the adapter folded in
        "eval_set": {"path": str(workdir / "corpus" / "qa_val.jsonl"), "limit": 4, "max_new_tokens": 4},
        "tracking": {"uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "lora", "model_versions": "final",
                     "system_metrics_interval_s": 0},
        "train": {"max_steps": 8, "micro_batch_size": 4, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1,
                  "eval_every": 8, "eval_batches": 1, "checkpoint_every": 4, "samples_at_eval": 0, "zero_stage": 3,
                  "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]}},
        "cluster": {"num_workers": 2},
    }


def test_lora_finetune_writes_adapter_only_checkpoints(workdir, ray_cluster):
    result = run_training(prepare_job(parse_spec(_spec(workdir, "lora"))))
    RUNS["lora"] = result
    from mlflow.tracking import MlflowClient

    scored = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_metric_history(result.run_id, "eval/exact_match")
    assert sorted(m.step for m in scored) == [0, 8]
    ckpt = Path(result.checkpoint)
    assert result.step == 8
    assert not (ckpt / "model.safetensors").exists()
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapter and all(".lora_" in key for key in adapter)
    assert {key.split(".")[-3] for key in adapter} == {"c_attn", "c_fc"}
    assert (ckpt / "adapter_model.safetensors").stat().st_size < (workdir / "base" / "model.safetensors").stat().st_size / 3
    ds_bytes = sum(p.stat().st_size for p in (ckpt / "deepspeed").rglob("*") if p.is_file())
    assert ds_bytes < 3 * (workdir / "base" / "model.safetensors").stat().st_size, "no frozen weights, no moments for them"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["base_checkpoint"] == str(workdir / "base") and state["lora"]["r"] == 4
    # only the adapted layers differ from the base once merged
    from orchestrator.registry.lora import merge_lora_checkpoint

    merged = load_file(str(merge_lora_checkpoint(str(ckpt), workdir / "merged") / "model.safetensors"))
    base = load_file(str(workdir / "base" / "model.safetensors"))
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    assert changed == {f"transformer.h.{i}.{layer}.weight" for i in range(2) for layer in ("attn.c_attn", "mlp.c_fc")}
    best = workdir / "runs" / "lora" / "best"
    assert (best / "adapter_model.safetensors").is_file() and not (best / "model.safetensors").exists()


def test_lora_crash_resume_continues_identically(workdir, ray_cluster):
    spec = _spec(workdir, "lora-crashy")
    spec["debug"] = {"fail_at_step": 6, "fail_rank": 1}
    spec["cluster"]["max_failures"] = 1
    crashed = run_training(prepare_job(parse_spec(spec)))
    assert (workdir / "runs" / "lora-crashy" / ".fault_injected").is_file(), "the fault fired"
    reference = Path(RUNS["lora"].checkpoint)
    got, want = (load_file(str(Path(c, "adapter_model.safetensors"))) for c in (crashed.checkpoint, reference))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    positions = [json.loads(Path(c, "trainer_state.json").read_text())["data_position"]
                 for c in (crashed.checkpoint, reference)]
    assert positions[0] == positions[1]
    history = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_metric_history(crashed.run_id, "train/loss")
    assert {m.step for m in history} == set(range(1, 9))


def test_registry_export_and_serving_get_the_merged_model(workdir, tmp_path):
    """The MLflow version, `gptctl export --merge` and a Serve replica's files: one merged model,
    whose logits agree with base + adapter within 1e-5."""
    from orchestrator.cli import main
    from orchestrator.jobs.controller import JobInputError, require_checkpoint
    from orchestrator.registry.models import resolve_model_uri
    from orchestrator.serve.app import _local_checkpoint

    ckpt = RUNS["lora"].checkpoint
    assert main(["export", "--merge", ckpt, "--out", str(tmp_path / "exported")]) == 0
    registered = resolve_model_uri(f"models:/{RUNS['lora'].model_name}@latest", f"sqlite:///{workdir / 'mlflow.db'}",
                                   dst_dir=str(tmp_path / "registered"))
    require_checkpoint(ckpt, "checkpoint", allow_adapter=True)  # what `gptctl deploy` checks
    with pytest.raises(JobInputError, match="init_from: .* is a LoRA adapter checkpoint; merge it"):
        require_checkpoint(ckpt, "init_from")
    served = _local_checkpoint(ckpt)
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = load_with_adapter(workdir / "base", ckpt)(idx)[0]
        for directory in (tmp_path / "exported", registered, served):
            assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in Path(directory).iterdir()}
            torch.testing.assert_close(load_pretrained(directory)(idx)[0], expected, atol=1e-5, rtol=0)


def test_deploy_serves_base_plus_adapter_like_the_merged_model(workdir, ray_cluster):
    """`gptctl deploy` of the LoRA checkpoint itself: the replica merges base + adapter at load and
    answers as the merged model does."""
    from ray import serve

    from infra.s3_endpoint import free_port
    from model import SamplingParams, generate
    from orchestrator.serve.deploy import deploy, query

    spec = parse_spec({"kind": "deploy", "name": "lora", "checkpoint": RUNS["lora"].checkpoint, "port": free_port(),
                       "route_prefix": "/lora", "cpus_per_replica": 0.5})
    url = deploy(spec)
    try:
        prompt = "Where does somebody live?"
        reply = query(url, prompt, max_tokens=6, temperature=0.0, use_template=False)
    finally:
        serve.delete("lora")
    merged = load_pretrained(workdir / "merged")
    tokenizer = GPTTokenizer.load(workdir / "base")
    ids = generate(merged, tokenizer.encode(prompt), SamplingParams(max_new_tokens=6, temperature=0.0,
                                                                    stop_token_ids=(tokenizer.eos_id,)))
    assert reply["completion_tokens"] == len(ids)
    assert reply["text"] == tokenizer.decode([i for i in ids if i != tokenizer.eos_id])
