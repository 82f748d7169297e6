"""Reading DeepSpeed's pickled checkpoint files without running code hidden in them.

DeepSpeed stores optimizer state with torch.save (pickle). Resume (workers/) and export
(orchestrator/) both read those files, always through torch.load(weights_only=True) with a
short allow-list of plain DeepSpeed classes; anything else is refused with
UnsafeCheckpointError instead of being unpickled.
"""
from __future__ import annotations

import contextlib

import torch

from model.hf import UnsafeCheckpointError


def _safe_globals() -> list:
    """Plain-data DeepSpeed classes that ZeRO optimizer state pickles (no code runs to rebuild them)."""
    found = []
    for module, name in (
        ("deepspeed.utils.tensor_fragment", "fragment_address"),  # a dataclass of ints
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),  # a few floats
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),  # an IntEnum
    ):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return found


def safe_torch_load(path, **kwargs):
    """torch.load forced to weights_only=True (plus the DeepSpeed allow-list); refuses anything else."""
    kwargs.pop("weights_only", None)
    kwargs.setdefault("map_location", "cpu")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, weights_only=True, **kwargs)
    except Exception as e:  # UnpicklingError for disallowed globals; RuntimeError for garbage
        raise UnsafeCheckpointError(
            f"{path}: refused to load with weights_only=True ({str(e).splitlines()[0]}). "
            "A DeepSpeed checkpoint holds only tensors and a few plain DeepSpeed classes; this file holds "
            "something else. Loading it would need weights_only=False, i.e. running its pickle code: "
            "do that only with trusted tooling on a trusted file."
        ) from None


class _WeightsOnlyTorch:
    """Stands in for `torch` inside deepspeed.utils.zero_to_fp32, whose loader passes weights_only=False."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        if args:  # torch.load(f, map_location) positional form
            kwargs.setdefault("map_location", args[0])
        kwargs.pop("weights_only", None)
        return safe_torch_load(f, **kwargs)


_DEEPSPEED_LOADERS = (
    "deepspeed.utils.zero_to_fp32",  # get_fp32_state_dict_from_zero_checkpoint
    "deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine",  # engine.load_checkpoint (resume)
)


@contextlib.contextmanager
def weights_only_deepspeed_loads():
    """Within this block DeepSpeed's checkpoint readers unpickle with weights_only=True.

    DeepSpeed 0.19 passes weights_only=False in zero_to_fp32 and in TorchCheckpointEngine.load
    (what `engine.load_checkpoint` uses to resume). Its files hold tensors plus a few plain
    DeepSpeed classes (allow-listed in `_safe_globals`), so the safe unpickler reads them; a
    file carrying anything else raises UnsafeCheckpointError instead of running it. Patches
    the modules' `torch` name for the duration: not for concurrent use from several threads.
    """
    import importlib

    saved = []
    try:
        for name in _DEEPSPEED_LOADERS:
            module = importlib.import_module(name)
            saved.append((module, module.torch))
            module.torch = _WeightsOnlyTorch()
        yield
    finally:
        for module, original in saved:
            module.torch = original
