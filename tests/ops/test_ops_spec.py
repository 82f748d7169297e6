"""One schema for all kinds: `gptctl schema`, pipeline validation naming every wrong field,
and secrets redacted when a resolved spec is printed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.spec import PipelineSpec, SpecError, load_spec, parse_spec, redact, render_spec

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_schema_command_prints_json_schema_for_all_kinds(gptctl):
    code, out, _ = gptctl("schema")
    assert code == 0
    schema = json.loads(out)
    text = json.dumps(schema)
    for kind in ("pretrain", "finetune", "deploy", "pipeline"):
        assert f'"{kind}"' in text
    assert "max_steps" in text and "stages" in text
    code, out, _ = gptctl("schema", "--kind", "pipeline")
    assert code == 0 and json.loads(out)["title"] == "PipelineSpec"


def test_example_pipeline_validates_with_three_stages():
    spec = load_spec(EXAMPLES / "pipeline.yaml")
    assert isinstance(spec, PipelineSpec)
    assert [stage.kind for stage in spec.stages] == ["pretrain", "finetune", "deploy"]
    # training stages inherit the pipeline's storage_path
    assert spec.stages[0].storage_path == spec.storage_path == spec.stages[1].storage_path


def test_validate_names_every_wrong_pipeline_field(gptctl, write_spec):
    path = write_spec({"kind": "pipeline", "name": "p", "stages": [
        {"kind": "finetune", "name": "f", "data": "d"},                                   # nothing to start from
        {"kind": "pretrain", "name": "a", "data": "d", "train": {"max_step": 3}},         # typo
        {"kind": "finetune", "id": "ft", "name": "b", "data": "d",
         "init_from": "${stages.pretrian.checkpoint}"},                                  # unknown stage
        {"kind": "deploy", "checkpoint": "${stages.pretrain.url}"},                       # wrong output
        {"kind": "pipeline", "name": "nested"},                                           # not a stage kind
    ]})
    code, _, err = gptctl("validate", path)
    assert code == 2
    assert "stages.0.init_from: required" in err
    assert "stages.1.train.max_step: unknown field" in err and "max_steps" in err
    assert "stages.2.init_from: ${stages.pretrian.checkpoint} refers to no earlier stage" in err
    assert "expected one of: finetune, pretrain" in err
    assert "stages.3.checkpoint" in err and "no output 'url'" in err and "best_checkpoint" in err
    assert "stages.4.kind: expected one of: pretrain, finetune, deploy" in err


def test_top_level_kind_lists_pipeline(write_spec, gptctl):
    code, _, err = gptctl("validate", write_spec({"kind": "pipline", "name": "x"}))
    assert code == 2 and "pretrain, finetune, deploy, pipeline" in err


def test_duplicate_stage_ids_need_explicit_ids():
    stages = [{"kind": "pretrain", "name": "a", "data": "d"},
              {"kind": "finetune", "name": "b", "data": "d"},
              {"kind": "finetune", "name": "c", "data": "d"}]
    with pytest.raises(SpecError, match="stages.2.id: duplicate stage id 'finetune'"):
        parse_spec({"kind": "pipeline", "name": "p", "stages": stages})
    stages[2]["id"] = "finetune-2"
    stages[2]["init_from"] = "${stages.finetune.best_checkpoint}"
    assert parse_spec({"kind": "pipeline", "name": "p", "stages": stages}).stage_id(2) == "finetune-2"


def test_resolve_prints_spec_with_secrets_redacted(gptctl, write_spec, monkeypatch):
    monkeypatch.setenv("GPTCTL_TEST_TOKEN", "s3cr3t-t0ken")
    monkeypatch.setenv("GPTCTL_TEST_PASSWORD", "hunter2")
    path = write_spec({"kind": "deploy", "name": "d", "checkpoint": "s3://b/ckpt",
                       "api_key_env": "GPTCTL_TEST_TOKEN"}, "deploy.yaml")
    code, out, _ = gptctl("resolve", path)
    assert code == 0 and "checkpoint: s3://b/ckpt" in out and "api_key_env: '***'" in out
    path = write_spec({"kind": "pretrain", "name": "p", "data": "s3://b/d",
                       "tracking": {"uri": "https://alice:${GPTCTL_TEST_PASSWORD}@mlflow.example.com"}}, "p.yaml")
    code, out, _ = gptctl("resolve", path)
    assert code == 0
    assert "hunter2" not in out and "https://***@mlflow.example.com" in out
    assert "max_steps: 100" in out, "defaults are filled in"


def test_redact_uses_the_mlflow_params_rule():
    from orchestrator.runs import flatten_params

    data = {"s3": {"secret_key": "x", "endpoint": "http://u:p@host"}, "api_key": "k", "token": None}
    assert redact(data) == {"s3": {"secret_key": "***", "endpoint": "http://***@host"}, "api_key": "***", "token": None}
    assert flatten_params(data)["s3.secret_key"] == "***"
    spec = parse_spec({"kind": "deploy", "checkpoint": "c", "api_key_file": "/run/secrets/key"})
    assert "api_key_file: '***'" in render_spec(spec)


def test_validation_errors_do_not_echo_secrets(gptctl, write_spec):
    path = write_spec({"kind": "deploy", "checkpoint": "c", "api_key_env": "sk-live-123 456",
                       "name": "https://bob:pa55@host"}, "bad.yaml")
    code, _, err = gptctl("validate", path)
    assert code == 2 and "api_key_env" in err and "name" in err
    assert "sk-live-123" not in err and "pa55" not in err
