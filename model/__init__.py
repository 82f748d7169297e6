"""GPT-2 model, tokenizer, sampling and checkpoint I/O, in pure PyTorch.

Importing this package only imports modules (torch, tokenizers, safetensors); it builds
nothing, touches no files, and changes no global state.
"""

from model.checkpoint import load_pretrained, save_pretrained
from model.config import PRESETS, GPTConfig, config_from_preset
from model.decode_layout import use_decode_layout
from model.generate import (
    generate,
    iter_generate,
)  # rebinds `generate` from the submodule to the function
from model.gpt import GPT
from model.sampling import SamplingParams
from model.tokenizer import GPTTokenizer

__all__ = [
    "GPT",
    "GPTConfig",
    "GPTTokenizer",
    "PRESETS",
    "SamplingParams",
    "config_from_preset",
    "generate",
    "iter_generate",
    "load_pretrained",
    "save_pretrained",
    "use_decode_layout",
]
