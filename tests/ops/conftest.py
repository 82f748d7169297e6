"""Fixtures for tests/ops: the CLI with the ops commands registered, tiny prepared data, and
small job specs (1 worker, 2 steps, a 1-layer model) so real runs stay short."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml


@pytest.fixture
def gptctl(capsys):
    """Run `gptctl ARGS…` in-process; returns (code, out, err)."""
    import orchestrator.cli as cli

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main([str(arg) for arg in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    """Pre-training shards and fine-tuning shards (same tokenizer), both tiny and local."""
    from orchestrator.data.corpus import write_demo_corpus
    from orchestrator.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("ops-data")
    corpus = write_demo_corpus(root / "corpus", n_people=10, seed=1)
    prepare_dataset([str(corpus["pretrain"])], str(root / "pretrain"), vocab_size=300, seq_len=32,
                    rows_per_shard=32, progress=False)
    prepare_dataset([str(corpus["qa_train"])], str(root / "qa"), seq_len=32,
                    tokenizer=str(root / "pretrain" / "tokenizer.json"), val_inputs=[str(corpus["qa_val"])],
                    rows_per_shard=16, progress=False)
    empty = root / "no-manifest"
    empty.mkdir()
    return {"pretrain": str(root / "pretrain"), "qa": str(root / "qa"), "empty": str(empty)}


TINY_TRAIN = {"max_steps": 2, "micro_batch_size": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1,
              "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2, "samples_at_eval": 0}


def _tiny_job(kind: str, name: str, data: str, storage: Path, tracking: str, **extra) -> dict:
    spec = {"kind": kind, "name": name, "data": data, "storage_path": str(storage),
            "tracking": {"uri": tracking, "experiment": "ops"}, "train": dict(TINY_TRAIN),
            "cluster": {"num_workers": 1, "cpus_per_worker": 1}}
    if kind == "pretrain":
        spec["model"] = {"preset": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32}
    spec.update(extra)
    return spec


@pytest.fixture
def write_spec(tmp_path):
    def write(data: dict, name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def _job_id_from(output: str) -> str:
    match = re.search(r"submitted job (\S+)", output)
    assert match, output
    return match.group(1)


@pytest.fixture
def tiny_job():
    """tiny_job(kind, name, data, storage_path, tracking_uri, **overrides) -> spec dict."""
    return _tiny_job


@pytest.fixture
def job_id_from():
    return _job_id_from
