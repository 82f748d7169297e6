from __future__ import annotations

import pytest

from orchestrator.runs import flatten_params
from orchestrator.spec import FinetuneSpec, PretrainSpec, SpecError, interpolate_env, parse_spec
from workers.schedule import lr_at


def test_defaults_resolve():
    spec = parse_spec({"kind": "pretrain", "name": "a", "data": "s3://b/p"})
    assert isinstance(spec, PretrainSpec)
    assert spec.train.zero_stage == 2 and spec.cluster.num_workers == 2
    fine = parse_spec({"kind": "finetune", "name": "b", "data": "d", "init_from": "c"})
    assert isinstance(fine, FinetuneSpec) and fine.train.lr == 1e-4


def test_min_lr_above_lr_is_refused():
    with pytest.raises(SpecError, match="min_lr"):
        parse_spec({"kind": "pretrain", "name": "a", "data": "d", "train": {"lr": 1e-4, "min_lr": 1e-3}})


def test_env_interpolation(monkeypatch):
    monkeypatch.setenv("GPTCTL_TEST_BUCKET", "b1")
    assert interpolate_env("s3://${GPTCTL_TEST_BUCKET}/x ${UNSET_GPTCTL_VAR:-dflt}") == "s3://b1/x dflt"
    with pytest.raises(SpecError, match="UNSET_GPTCTL_VAR"):
        interpolate_env("${UNSET_GPTCTL_VAR}")


def test_params_redact_secrets():
    flat = flatten_params({"s3": {"secret_key": "hunter2", "endpoint": "http://x"}, "api_key": "k"})
    assert flat == {"s3.secret_key": "***", "s3.endpoint": "http://x", "api_key": "***"}


def test_lr_schedule_warmup_then_cosine():
    kwargs = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kwargs) == pytest.approx(0.1)
    assert lr_at(9, **kwargs) == pytest.approx(1.0)
    assert lr_at(60, **kwargs) == pytest.approx(0.55)
    assert lr_at(110, **kwargs) == pytest.approx(0.1)
    values = [lr_at(s, **kwargs) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parents[2].joinpath("examples").glob("*.yaml")))
def test_example_specs_validate(path):
    from orchestrator.spec import load_spec

    spec = load_spec(path)
    assert spec.kind == path.stem


def test_model_versions_choice_is_checked():
    base = {"kind": "pretrain", "name": "a", "data": "d"}
    assert parse_spec(base).tracking.model_versions == "every_checkpoint"
    assert parse_spec({**base, "tracking": {"model_versions": "final"}}).tracking.model_versions == "final"
    with pytest.raises(SpecError, match="model_versions"):
        parse_spec({**base, "tracking": {"model_versions": "sometimes"}})


def test_system_metrics_interval_is_checked():
    base = {"kind": "pretrain", "name": "a", "data": "d"}
    assert parse_spec(base).tracking.system_metrics_interval_s == 5.0
    assert parse_spec({**base, "tracking": {"system_metrics_interval_s": 0}}).tracking.system_metrics_interval_s == 0
    with pytest.raises(SpecError, match="system_metrics_interval_s"):
        parse_spec({**base, "tracking": {"system_metrics_interval_s": -1}})


def test_checkpoint_upload_mode_defaults_to_bounded_and_names_the_choices():
    spec = parse_spec({"kind": "pretrain", "name": "a", "data": "d"})
    assert spec.train.checkpoint_upload == "bounded"
    assert parse_spec({"kind": "pretrain", "name": "a", "data": "d",
                       "train": {"checkpoint_upload": "parallel"}}).train.checkpoint_upload == "parallel"
    with pytest.raises(SpecError, match=r"train\.checkpoint_upload.*'bounded' or 'parallel'"):
        parse_spec({"kind": "pretrain", "name": "a", "data": "d", "train": {"checkpoint_upload": "fast"}})


def test_attention_kernel_defaults_to_auto_and_names_the_choices():
    assert parse_spec({"kind": "pretrain", "name": "a", "data": "d"}).train.attention_kernel == "auto"
    with pytest.raises(SpecError, match=r"train\.attention_kernel.*'auto', 'flash', 'cudnn', 'efficient' or 'math'"):
        parse_spec({"kind": "pretrain", "name": "a", "data": "d", "train": {"attention_kernel": "xformers"}})


def test_gpu_only_settings_on_cpu_workers_are_named_before_anything_runs():
    """Without cluster.use_gpu Ray hides the GPUs from the workers: fp16 and CUDA-only attention
    kernels would fail on every worker, so validation names them (stage paths included)."""
    base = {"kind": "pretrain", "name": "a", "data": "d", "train": {"precision": "fp16", "attention_kernel": "cudnn"}}
    with pytest.raises(SpecError) as problems:
        parse_spec(base)
    assert "train.precision: fp16 needs GPU workers (cluster.use_gpu: true)" in str(problems.value)
    assert "train.attention_kernel: cudnn needs GPU workers (cluster.use_gpu: true)" in str(problems.value)
    assert parse_spec({**base, "cluster": {"use_gpu": True}}).train.precision == "fp16"
    with pytest.raises(SpecError, match=r"stages\.1\.train\.attention_kernel: efficient needs GPU workers"):
        parse_spec({"kind": "pipeline", "name": "p", "stages": [
            {"kind": "pretrain", "id": "one", "name": "s", "data": "d"},
            {"kind": "finetune", "id": "two", "name": "t", "data": "d", "train": {"attention_kernel": "efficient"}}]})
