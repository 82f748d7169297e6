"""Whether a directory is a checkpoint that serving or fine-tuning can read.

Shared by the controller (`init_from`) and `deploy` (`checkpoint`), so it lives below both.
"""
from __future__ import annotations

from orchestrator.registry.lora import LoraCheckpointError, base_checkpoint_of, is_lora_checkpoint
from orchestrator.spec import JobInputError
from workers import storage
from workers.checkpointing import REQUIRED_SERVING_FILES


def require_checkpoint(uri: str, field: str, allow_adapter: bool = False) -> None:
    """A directory that serving/fine-tuning can read: the files named in ARCHITECTURE.md, or (where
    `allow_adapter`: serving) a LoRA adapter checkpoint whose base has them."""
    storage.check_reachable(uri)
    if is_lora_checkpoint(uri):
        if not allow_adapter:
            raise JobInputError(f"{field}: {uri} is a LoRA adapter checkpoint; merge it into a full one first "
                                f"(gptctl export --merge {uri} --out DIR) and use DIR")
        try:
            base_checkpoint_of(uri)
        except LoraCheckpointError as error:
            raise JobInputError(f"{field}: {error}") from None
        return
    missing = [name for name in REQUIRED_SERVING_FILES
               if not storage.exists(storage.join(uri, name))]
    if missing:
        raise JobInputError(f"{field}: {uri} holds no gptctl checkpoint (missing {', '.join(missing)})")
