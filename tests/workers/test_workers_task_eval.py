"""Task evaluation: SQuAD-style scoring, greedy answers, the eval set in a fine-tune's MLflow run,
and an eval set without responses refused at `gptctl validate`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import GPT, GPTConfig, GPTTokenizer, SamplingParams, generate
from model.checkpoint import save_pretrained
from workers.task_eval import (TABLE_COLUMNS, evaluate_pairs, exact_match, generate_answers, normalize_answer,
                               score_answers, token_f1)


def test_normalisation_drops_case_punctuation_articles_and_spacing():
    assert normalize_answer("  The  Favourite colour, of Ana is BROWN. ") == "favourite colour of ana is brown"
    assert normalize_answer("An owl!") == "owl" and normalize_answer("theatre") == "theatre"


def test_exact_match_and_token_f1():
    assert exact_match("Brown.", "brown") == 1.0 and exact_match("purple", "brown") == 0.0
    assert token_f1("the colour is brown", "brown") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("Ana lives in Paris", "Ana lives in Rome") == pytest.approx(0.75)
    assert token_f1("", "") == 1.0 and token_f1("", "brown") == 0.0 and token_f1("red", "brown") == 0.0
    scores = score_answers(["q1", "q2"], ["brown", "Paris"], ["Brown", "Rome"])
    assert (scores.exact_match, scores.f1) == (0.5, 0.5)
    assert list(scores.table()) == list(TABLE_COLUMNS) and scores.table()["generated"] == ["Brown", "Rome"]


@pytest.fixture(scope="module")
def tiny_lm() -> tuple[GPT, GPTTokenizer]:
    tokenizer = GPTTokenizer.train(["Ana lives in Paris. Bo lives in Rome. What pet does Ana have?"] * 4, 300)
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)), tokenizer


def test_batched_greedy_answers_are_the_sequential_ones(tiny_lm, one_torch_thread):
    model, tokenizer = tiny_lm
    model.train()
    inputs = ["Ana lives in", "What pet does Bo have?\n", "Rome"]
    answers = generate_answers(model, tokenizer, inputs, max_new_tokens=6)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=(tokenizer.eos_id,))
    assert answers == [tokenizer.decode(generate(model, tokenizer.encode(text), params)) for text in inputs]
    assert model.training, "the caller's train/eval flag is restored"
    scores = evaluate_pairs(model, tokenizer, [{"prompt": "Ana", "response": answers[0]}], "{prompt} lives in",
                            max_new_tokens=6)
    assert scores.exact_match == 1.0 and scores.rows[0]["prompt"] == "Ana"


def _write_spec(path: Path, eval_path: str) -> str:
    path.write_text(f"kind: finetune\nname: qa\ninit_from: ./ckpt\ndata: ./qa\neval_set:\n  path: {eval_path}\n")
    return str(path)


def test_validate_refuses_an_eval_set_row_without_a_response(tmp_path, capsys, s3_endpoint):
    from orchestrator.cli import EXIT_BAD_INPUT, main
    from workers import storage

    rows = '{"prompt": "Where does Ana live?", "response": " Paris."}\n{"prompt": "What pet does Bo have?"}\n'
    (tmp_path / "qa.jsonl").write_text(rows)
    assert main(["validate", _write_spec(tmp_path / "job.yaml", str(tmp_path / "qa.jsonl"))]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f'eval_set.path: {tmp_path / "qa.jsonl"}:2: row has no "response"' in err and '"prompt"' in err

    storage.ensure_bucket("s3://taskeval")
    storage.write_text("s3://taskeval/qa.jsonl", rows.replace('"response": " Paris."', '"answer": " Paris."'))
    assert main(["validate", _write_spec(tmp_path / "s3.yaml", "s3://taskeval/qa.jsonl")]) == EXIT_BAD_INPUT
    assert 's3://taskeval/qa.jsonl:1: row has no "response"' in capsys.readouterr().err

    typo = tmp_path / "typo.yaml"
    typo.write_text("kind: finetune\nname: qa\ninit_from: ./ckpt\ndata: ./qa\neval_set:\n  paht: qa.jsonl\n")
    assert main(["validate", str(typo)]) == EXIT_BAD_INPUT
    assert "eval_set.paht: unknown field; expected one of: limit, max_new_tokens, path" in capsys.readouterr().err

    (tmp_path / "qa.jsonl").write_text(rows.splitlines()[0] + "\n")
    assert main(["validate", _write_spec(tmp_path / "ok.yaml", str(tmp_path / "qa.jsonl"))]) == 0


@pytest.mark.integration
def test_a_finetune_logs_task_scores_and_an_answer_table(tmp_path, ray_cluster):
    """ZeRO-3 on two workers: the hardest layout for generation (sharded weights)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.jobs.controller import prepare_job, run_training
    from orchestrator.data.corpus import write_demo_corpus
    from orchestrator.data.prepare import prepare_dataset
    from orchestrator.spec import parse_spec

    corpus = write_demo_corpus(tmp_path / "corpus", n_people=20, seed=3)
    tokenizer = GPTTokenizer.train(corpus["qa_train"].read_text().splitlines(), 300)
    tokenizer.save(tmp_path / "tokenizer.json")
    prepare_dataset([str(corpus["qa_train"])], str(tmp_path / "qa"), seq_len=32, tokenizer=str(tmp_path / "tokenizer.json"),
                    val_fraction=0.0, rows_per_shard=64, progress=False, val_inputs=[str(corpus["qa_val"])])
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    save_pretrained(tmp_path / "init", GPT(config), config, tokenizer=tokenizer)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_training(prepare_job(parse_spec({
        "kind": "finetune", "name": "task-eval", "init_from": str(tmp_path / "init"), "data": str(tmp_path / "qa"),
        "eval_set": {"path": str(corpus["qa_val"]), "limit": 5, "max_new_tokens": 8},
        "storage_path": str(tmp_path / "runs"), "tracking": {"uri": tracking, "system_metrics_interval_s": 0},
        "train": {"max_steps": 4, "micro_batch_size": 4, "eval_every": 2, "checkpoint_every": 4, "zero_stage": 3,
                  "samples_at_eval": 0},
        "cluster": {"num_workers": 2},
    })))
    client = MlflowClient(tracking)
    for key in ("eval/exact_match", "eval/f1"):
        history = client.get_metric_history(result.run_id, key)
        assert sorted(m.step for m in history) == [0, 2, 4], key
        assert all(0.0 <= m.value <= 1.0 for m in history)
    table = json.loads(Path(client.download_artifacts(result.run_id, "eval/answers_step_00000004.json",
                                                      str(tmp_path / "artifacts"))).read_text())
    assert table["columns"] == list(TABLE_COLUMNS)
    expected = [json.loads(line) for line in corpus["qa_val"].read_text().splitlines()[:5]]
    assert [row[:2] for row in table["data"]] == [[r["prompt"], r["response"]] for r in expected]
