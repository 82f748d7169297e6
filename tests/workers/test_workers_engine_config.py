"""DeepSpeed config built from the spec, and the precision guard."""
from __future__ import annotations

import re

import pytest

from orchestrator.spec import SpecError, TrainSpec, parse_spec
from workers.engine import (AttentionKernelError, DeepSpeedConfigError, PrecisionError, check_attention_kernel,
                            check_deepspeed_config, check_precision, deepspeed_config)
from workers.deepspeed_check import deepspeed_config_problems
from workers.metrics import mfu, peak_flops_by_name


def test_zero3_with_offload():
    config = deepspeed_config(TrainSpec(zero_stage=3, offload_optimizer=True, offload_params=True,
                                        micro_batch_size=4, grad_accum_steps=2, precision="bf16"))
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu" and zero["stage3_gather_16bit_weights_on_model_save"]
    assert config["zero_force_ds_cpu_optimizer"] is False
    assert config["bf16"] == {"enabled": True} and config["gradient_accumulation_steps"] == 2


def test_offload_needs_the_right_stage():
    with pytest.raises(SpecError, match="offload_params needs zero_stage 3"):
        parse_spec({"kind": "pretrain", "name": "a", "data": "d", "train": {"zero_stage": 2, "offload_params": True}})
    with pytest.raises(SpecError, match="offload_optimizer"):
        parse_spec({"kind": "pretrain", "name": "a", "data": "d", "train": {"zero_stage": 0, "offload_optimizer": True}})


def test_fp16_on_cpu_is_a_clear_error():
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        pytest.skip("this machine's accelerator supports fp16")
    with pytest.raises(PrecisionError, match="train.precision: fp16 is not supported on the cpu accelerator"):
        check_precision("fp16")
    check_precision("fp32")


def test_cuda_only_attention_kernels_on_cpu_are_a_clear_error():
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        pytest.skip("this machine has a CUDA accelerator")
    for kernel in ("cudnn", "efficient"):
        with pytest.raises(AttentionKernelError, match=f"train.attention_kernel: {kernel} runs only on CUDA GPUs"):
            check_attention_kernel(kernel)
    for kernel in ("auto", "flash", "math"):
        check_attention_kernel(kernel)


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12), ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 NVL", "bf16", 835e12), ("NVIDIA H200", "bf16", 989e12), ("NVIDIA GH200 480GB", "bf16", 989e12),
    ("NVIDIA H20", "bf16", 148e12), ("NVIDIA B200", "bf16", 2250e12), ("NVIDIA GB200", "bf16", 2500e12),
    ("NVIDIA L40S", "bf16", 362e12), ("NVIDIA L40", "bf16", 181e12), ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5e12), ("AMD Instinct MI300X", "bf16", 1307e12),
    ("Tesla V100-SXM2-16GB", "bf16", None), ("NVIDIA GeForce GTX 1080", "bf16", None),
])
def test_peak_flops_matches_the_most_specific_device_name(name, precision, peak):
    """A variant's name contains its family's ("H100 NVL" ⊃ "H100", "GH200" ⊃ "H200" ⊃ "H20")."""
    assert peak_flops_by_name(name, precision) == peak


def test_mfu_arithmetic():
    assert mfu(6e9, 1e4, 1e14) == pytest.approx(0.6)
    assert mfu(6e9, 1e4, None) is None


def test_extra_deepspeed_config_is_merged_section_by_section():
    config = deepspeed_config(TrainSpec(zero_stage=2, deepspeed={
        "zero_optimization": {"reduce_bucket_size": 1000, "overlap_comm": True}, "wall_clock_breakdown": True}))
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000, "overlap_comm": True}
    assert config["wall_clock_breakdown"] is True


@pytest.mark.parametrize("extra, field", [
    ({"zero_optimization": {"stage": 3}}, "train.zero_stage"),
    ({"bf16": {"enabled": True}}, "train.precision"),
    ({"train_micro_batch_size_per_gpu": 4}, "train.micro_batch_size"),
])
def test_extra_deepspeed_config_cannot_contradict_a_spec_field(extra, field):
    with pytest.raises(SpecError, match=rf"deepspeed\..* is set from {field}"):
        parse_spec({"kind": "pretrain", "name": "a", "data": "d", "train": {"deepspeed": extra}})


def test_a_deepspeed_key_deepspeed_would_ignore_is_named_before_submission():
    """DeepSpeed ignores top-level keys it does not know: a typo would silently keep the default."""
    spec = {"kind": "pretrain", "name": "a", "data": "d",
            "train": {"deepspeed": {"wall_clock_breakdwn": True, "zero_optimization": {"reduce_bucket_sise": 5}}}}
    with pytest.raises(SpecError) as refused:
        parse_spec(spec, "job.yaml")
    assert str(refused.value).splitlines()[1:] == [
        "  - train.deepspeed.zero_optimization.reduce_bucket_sise: Extra inputs are not permitted"]
    del spec["train"]["deepspeed"]["zero_optimization"]  # DeepSpeed stops at its first invalid section
    with pytest.raises(SpecError, match=r"train\.deepspeed\.wall_clock_breakdwn: not a setting DeepSpeed "
                                        r"\S+ reads, so it would be ignored; did you mean wall_clock_breakdown\?"):
        parse_spec(spec, "job.yaml")
    with pytest.raises(DeepSpeedConfigError, match=r"^train\.deepspeed: steps_per_prnt: .*did you mean steps_per_print\?"):
        check_deepspeed_config(deepspeed_config(TrainSpec(deepspeed={"steps_per_prnt": 5})))


@pytest.mark.parametrize("extra, path, why", [
    # a section DeepSpeed reads key by key: docs/training.md's own example, misspelt
    ({"torch_autocast": {"enabeld": True}}, "train.deepspeed.torch_autocast.enabeld",
     r"^not a setting DeepSpeed \S+ reads, so it would be ignored; did you mean enabled\?$"),
    ({"checkpoint": {"parallel_write": {"pipeline_stag": True}}}, "train.deepspeed.checkpoint.parallel_write.pipeline_stag",
     r"did you mean pipeline_stage\?$"),
    # a section a schema checks: named by where it sits in the config, not by DeepSpeed's model
    ({"timers": {"throughput": {"enabeld": True}}}, "train.deepspeed.timers.throughput.enabeld",
     r"^Extra inputs are not permitted"),
    ({"tensorboard": {"outpt_path": "tb"}}, "train.deepspeed.tensorboard.outpt_path", r"^Extra inputs are not permitted"),
    # a block DeepSpeed removed: its own message, under the field's name
    ({"elasticity": {"enabled": False}}, "train.deepspeed", r"^Elastic training has been removed"),
])
def test_nested_deepspeed_keys_are_checked_where_they_sit(extra, path, why):
    with pytest.raises(SpecError) as refused:
        parse_spec({"kind": "pretrain", "name": "a", "data": "d", "train": {"deepspeed": extra}})
    [line] = str(refused.value).splitlines()[1:]
    location, _, message = line.removeprefix("  - ").partition(": ")
    assert location == path
    assert re.search(why, message), message


@pytest.mark.parametrize("extra", [
    {"wall_clock_breakdown": True},
    {"activation_checkpointing": {"partition_activations": False}},  # read as `key in config.keys()`
    {"flops_profiler": {"enabled": False}},
    {"checkpoint": {"tag_validation": "Warn", "parallel_write": {"pipeline_stage": False}}},
    {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": ["torch.nn.Linear"]}},
    {"timers": {"throughput": {"enabled": True, "synchronized": False}}},
    {"zero_optimization": {"reduce_bucket_size": 1000, "overlap_comm": False}},
    {"sequence_parallel_size": 1},  # read by deepspeed.initialize, not by its config parser
])
def test_keys_deepspeed_reads_pass_the_check(extra):
    parse_spec({"kind": "pretrain", "name": "a", "data": "d", "train": {"deepspeed": extra}})
    assert deepspeed_config_problems(deepspeed_config(TrainSpec(deepspeed=extra))) == []


def test_inside_a_section_only_near_misses_are_refused():
    """DeepSpeed might read a section's other keys unseen; a wrong refusal would block a valid config."""
    assert deepspeed_config_problems(deepspeed_config(TrainSpec(deepspeed={
        "torch_autocast": {"enabled": True, "owner_note": "x"}}))) == []
    [(path, _)] = deepspeed_config_problems(deepspeed_config(TrainSpec(deepspeed={"owner_note": "x"})))
    assert path == "owner_note"  # DeepSpeed's parser asks for every top-level key it knows


def test_single_worker_zero2_skips_the_contiguous_gradient_copy():
    assert deepspeed_config(TrainSpec(zero_stage=2), world_size=1)["zero_optimization"]["contiguous_gradients"] is False
    assert "contiguous_gradients" not in deepspeed_config(TrainSpec(zero_stage=2), world_size=2)["zero_optimization"]
    override = TrainSpec(zero_stage=2, deepspeed={"zero_optimization": {"contiguous_gradients": True}})
    assert deepspeed_config(override, world_size=1)["zero_optimization"]["contiguous_gradients"] is True


def test_a_worker_imports_deepspeed_without_mlflow_and_can_import_mlflow_after():
    """A fresh worker process: DeepSpeed's autotuner would import MLflow (~0.9 s) on the way."""
    import subprocess
    import sys

    probe = ("import sys; from workers.engine import import_deepspeed; import_deepspeed(); "
             "loaded_early = 'mlflow' in sys.modules; import mlflow.tracking; "
             "from deepspeed.autotuning import autotuner; "
             "print(loaded_early, autotuner.has_mlflow, callable(mlflow.tracking.MlflowClient))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines()[-1].split() == ["False", "False", "True"], out.stdout[-2000:] + out.stderr[-2000:]
