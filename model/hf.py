"""Hugging Face GPT-2 interoperability: gptctl checkpoint <-> `GPT2LMHeadModel` directory.

Pure torch + safetensors + tokenizers: `transformers` is NOT needed to export or import, only
to load what is exported. Nothing here unpickles anything: weights are read from safetensors
only, and a directory whose weights exist only as pickle (`pytorch_model.bin`, `*.pt`,
`*.ckpt`) is refused without opening those files.

Mapping (both are GPT-2; only the storage differs):
  * gptctl uses `nn.Linear` (weight [out, in]); HF GPT-2 uses `Conv1D` (weight [in, out]):
    the four projection matrices per block (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
    are transposed. Transposition is exact, so a round trip is bit-identical.
  * GELU: gptctl's `nn.GELU(approximate="tanh")` == HF `gelu_new` (written on export;
    `gelu_pytorch_tanh`, `gelu_fast` and `gelu_new` are accepted on import).
  * LayerNorm eps 1e-5 == HF `layer_norm_epsilon` default; attention scaled by
    1/sqrt(head_dim) (`scale_attn_weights=True`, `scale_attn_by_inverse_layer_idx=False`).
  * Tied LM head: gptctl stores `transformer.wte.weight` once; HF ties via
    `tie_word_embeddings=True` (an `lm_head.weight` in an imported file must equal wte).
  * `bias=False` models: HF GPT-2 always has biases, so zeros are written (identical outputs)
    and `config.json["gptctl"]["bias"] = false` lets the import drop them again.

Tokenizer policy on import: gptctl's GPTTokenizer needs `<|endoftext|>` (end of document) and
`<|pad|>`. `<|endoftext|>` must already be in the HF vocabulary (GPT-2's is). A missing
`<|pad|>` is added as a special token at the next free id when the embedding has a spare row
(e.g. a vocab padded to a multiple of 64); when it does not (GPT-2's 50257 tokens == 50257
rows) the import either grows the embedding to the next multiple of 64 with new rows set to
the mean embedding (`resize_embeddings=True`, the default, HF's own convention for new
tokens) or refuses with a message (`resize_embeddings=False`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor

from model.checkpoint import (
    CONFIG_FILE,
    EMBEDDING_KEY,
    TIED_KEY,
    WEIGHTS_FILE,
    _atomic_write,
    _check_against_config,
    _read_safetensors,
    load_config,
    save_pretrained,
    state_dict_for_saving,
)
from model.config import GPTConfig
from model.tokenizer import EOS_TOKEN, PAD_TOKEN, TOKENIZER_FILE, GPTTokenizer

__all__ = [
    "HFFormatError",
    "UnsafeCheckpointError",
    "GENERATION_CONFIG_FILE",
    "TOKENIZER_CONFIG_FILE",
    "SPECIAL_TOKENS_MAP_FILE",
    "HF_FILES",
    "HFImportInfo",
    "export_hf_dir",
    "import_hf_dir",
    "is_hf_config",
    "gptctl_to_hf_state_dict",
    "hf_to_gptctl_state_dict",
    "hf_config_dict",
    "gpt_config_from_hf",
    "refuse_pickle_only",
]

GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
HF_FILES = (
    CONFIG_FILE,
    WEIGHTS_FILE,
    GENERATION_CONFIG_FILE,
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    SPECIAL_TOKENS_MAP_FILE,
)
# Files that hold weights as pickle; their presence alone never makes us open them.
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old HF files
_LN_EPS = 1e-5  # torch nn.LayerNorm default, what gptctl's GPT uses


class HFFormatError(ValueError):
    """A directory that is not a GPT-2 model gptctl can represent exactly; the message says why."""


class UnsafeCheckpointError(HFFormatError):
    """Weights that could only be read by unpickling (arbitrary code); refused, never opened."""


# --------------------------------------------------------------------------- configs


def hf_config_dict(config: GPTConfig, eos_id: int | None, pad_id: int | None) -> dict[str, Any]:
    """config.json of a `GPT2LMHeadModel` with exactly gptctl's architecture."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,  # read by old transformers versions
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # tanh approximation, == nn.GELU(approximate="tanh")
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": _LN_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # 1/sqrt(head_dim), as SDPA's default
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        # not read by transformers; lets import_hf restore a bias-free gptctl model exactly
        "gptctl": {"bias": config.bias, "format": 1},
    }


def is_hf_config(data: dict[str, Any]) -> bool:
    """True for a Hugging Face GPT-2 config.json (a gptctl config has no model_type)."""
    archs = data.get("architectures") or []
    return data.get("model_type") == "gpt2" or any(str(a).startswith("GPT2") for a in archs)


def gpt_config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """The GPTConfig of an HF GPT-2 config, or HFFormatError naming what gptctl cannot represent."""
    if not is_hf_config(hf):
        raise HFFormatError(
            f"config.json is not a GPT-2 config (model_type={hf.get('model_type')!r}, "
            f"architectures={hf.get('architectures')!r}); only GPT-2 can be imported"
        )
    problems = []
    n_embd = int(hf.get("n_embd", 768))
    n_inner = hf.get("n_inner")
    if n_inner not in (None, 4 * n_embd):
        problems.append(f"n_inner={n_inner} (gptctl's MLP is 4*n_embd={4 * n_embd})")
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        problems.append(f"activation_function={act!r} (gptctl uses the tanh GELU: {', '.join(_TANH_GELUS)})")
    eps = float(hf.get("layer_norm_epsilon", _LN_EPS))
    if not math.isclose(eps, _LN_EPS, rel_tol=0, abs_tol=1e-12):
        problems.append(f"layer_norm_epsilon={eps} (gptctl uses {_LN_EPS})")
    if not hf.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=false (gptctl scales attention by 1/sqrt(head_dim))")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=true (not supported by gptctl)")
    if hf.get("add_cross_attention", False):
        problems.append("add_cross_attention=true (gptctl is decoder-only)")
    if hf.get("tie_word_embeddings", True) is False:
        problems.append("tie_word_embeddings=false (gptctl ties the LM head to the token embedding)")
    if problems:
        raise HFFormatError("HF GPT-2 config not representable by gptctl: " + "; ".join(problems))
    dropout = float(hf.get("resid_pdrop", 0.0) or 0.0)
    gptctl_meta = hf.get("gptctl") if isinstance(hf.get("gptctl"), dict) else {}
    try:
        return GPTConfig(
            vocab_size=int(hf.get("vocab_size", 50257)),
            block_size=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            n_layer=int(hf.get("n_layer", 12)),
            n_head=int(hf.get("n_head", 12)),
            n_embd=n_embd,
            dropout=dropout,
            bias=bool(gptctl_meta.get("bias", True)),
        )
    except ValueError as e:
        raise HFFormatError(f"HF GPT-2 config: {e}") from None


# --------------------------------------------------------------------------- weights


def gptctl_to_hf_state_dict(tensors: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """gptctl keys (no lm_head) -> HF GPT2LMHeadModel keys, Conv1D weights transposed, biases filled."""
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if key == TIED_KEY:
            continue
        if key.endswith(_CONV1D_SUFFIXES):
            t = t.t()
        out[key] = t.contiguous()
    if not config.bias:  # HF GPT-2 always has biases: zeros reproduce the bias-free model exactly
        for key, t in list(out.items()):
            if key.endswith(_CONV1D_SUFFIXES):  # Conv1D weight [in, out]: bias has `out` entries
                out[key[: -len("weight")] + "bias"] = torch.zeros(t.shape[1], dtype=t.dtype)
            elif key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                out[key[: -len("weight")] + "bias"] = torch.zeros_like(t)
    return out


def hf_to_gptctl_state_dict(tensors: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """HF GPT-2 keys (with or without the `transformer.` prefix) -> gptctl keys, checked against config."""
    out: dict[str, Tensor] = {}
    lm_head = None
    for key, t in tensors.items():
        if key.endswith(_HF_IGNORED_SUFFIXES):
            continue
        if key == TIED_KEY:
            lm_head = t
            continue
        name = key if key.startswith("transformer.") else f"transformer.{key}"
        if name.endswith(_CONV1D_SUFFIXES):
            if t.dim() != 2:
                raise HFFormatError(f"{key}: expected a 2-D Conv1D weight, got shape {tuple(t.shape)}")
            t = t.t()
        if name in out:
            raise HFFormatError(f"weights hold {key!r} twice (with and without the transformer. prefix)")
        out[name] = t.contiguous()
    if lm_head is not None and EMBEDDING_KEY in out and not torch.equal(lm_head, out[EMBEDDING_KEY]):
        raise HFFormatError("lm_head.weight differs from transformer.wte.weight; gptctl needs tied weights")
    if not config.bias:
        biases = [k for k in out if k.endswith(".bias")]
        nonzero = [k for k in biases if torch.count_nonzero(out[k])]
        if nonzero:
            raise HFFormatError(
                f"config says bias=false but {len(nonzero)} bias tensor(s) are non-zero (e.g. {nonzero[0]})"
            )
        for k in biases:
            del out[k]
    try:
        _check_against_config(out, config)
    except ValueError as e:
        raise HFFormatError(f"HF weights do not match their config.json: {e}") from None
    return out


def refuse_pickle_only(directory: Path) -> None:
    """Raise UnsafeCheckpointError if the directory's weights exist only as pickle files."""
    if (directory / WEIGHTS_FILE).exists() or (directory / SAFETENSORS_INDEX_FILE).exists():
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.name in PICKLE_WEIGHT_FILES
                     or p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    if pickled:
        raise UnsafeCheckpointError(
            f"{directory} holds weights only as pickle ({', '.join(pickled)}); gptctl reads weights "
            "from safetensors only, since unpickling can run arbitrary code. Convert them with trusted "
            "tooling (e.g. transformers `save_pretrained(..., safe_serialization=True)`) and retry."
        )
    raise HFFormatError(f"{directory}: no {WEIGHTS_FILE} (or {SAFETENSORS_INDEX_FILE}) found")


def read_hf_weights(directory: Path) -> dict[str, Tensor]:
    """All tensors of an HF directory: model.safetensors or an index of safetensors shards."""
    refuse_pickle_only(directory)
    if (directory / WEIGHTS_FILE).exists():
        return _read_checked(directory / WEIGHTS_FILE)
    index = json.loads((directory / SAFETENSORS_INDEX_FILE).read_text(encoding="utf-8"))
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(index.get("weight_map", {}).values())):
        path = (directory / shard).resolve()
        if directory.resolve() not in path.parents or not shard.endswith(".safetensors"):
            raise HFFormatError(f"{SAFETENSORS_INDEX_FILE}: shard {shard!r} is not a .safetensors file in {directory}")
        tensors.update(_read_checked(path))
    return tensors


def _read_checked(path: Path) -> dict[str, Tensor]:
    try:
        return _read_safetensors(path, "cpu")
    except ValueError as e:
        if "pickle" in str(e):
            raise UnsafeCheckpointError(str(e)) from None
        raise HFFormatError(str(e)) from None


# --------------------------------------------------------------------------- tokenizer files


def _tokenizer_config(tokenizer: GPTTokenizer, block_size: int) -> dict[str, Any]:
    added = {
        str(i): {"content": tok, "lstrip": False, "rstrip": False, "normalized": False,
                 "single_word": False, "special": True}
        for tok, i in ((EOS_TOKEN, tokenizer.eos_id), (PAD_TOKEN, tokenizer.pad_id))
    }
    return {
        # PreTrainedTokenizerFast loads tokenizer.json as is (transformers 4.x and 5.x)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_prefix_space": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": block_size,
        "added_tokens_decoder": added,
    }


def _special_tokens_map() -> dict[str, Any]:
    token = lambda t: {"content": t, "lstrip": False, "rstrip": False,  # noqa: E731
                       "normalized": False, "single_word": False}
    return {"bos_token": token(EOS_TOKEN), "eos_token": token(EOS_TOKEN),
            "unk_token": token(EOS_TOKEN), "pad_token": token(PAD_TOKEN)}


# --------------------------------------------------------------------------- export


def export_hf_dir(checkpoint_dir: str | Path, out_dir: str | Path) -> None:
    """Local gptctl checkpoint directory -> local HF GPT-2 directory (see module docstring)."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    config = load_config(checkpoint_dir)
    tensors = _read_checked(checkpoint_dir / WEIGHTS_FILE)
    _check_against_config(tensors, config)
    tokenizer = GPTTokenizer.load(checkpoint_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise HFFormatError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size} embeddings"
        )
    hf = gptctl_to_hf_state_dict(tensors, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / WEIGHTS_FILE, lambda tmp: save_file(hf, str(tmp), metadata={"format": "pt"}))
    files = {
        CONFIG_FILE: hf_config_dict(config, tokenizer.eos_id, tokenizer.pad_id),
        GENERATION_CONFIG_FILE: {
            "bos_token_id": tokenizer.eos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
            "do_sample": False,
        },
    }
    for name, data in files.items():
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        _atomic_write(out_dir / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    write_hf_tokenizer_files(tokenizer, config.block_size, out_dir)


def write_hf_tokenizer_files(tokenizer: GPTTokenizer, max_length: int, out_dir: str | Path) -> None:
    """The tokenizer files of an HF directory (tokenizer.json + config + special tokens map), alone:
    enough for transformers.AutoTokenizer, e.g. for a client that counts tokens for an endpoint."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in ((TOKENIZER_CONFIG_FILE, _tokenizer_config(tokenizer, max_length)),
                       (SPECIAL_TOKENS_MAP_FILE, _special_tokens_map())):
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        _atomic_write(out_dir / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    _atomic_write(out_dir / TOKENIZER_FILE, tokenizer.save)


# --------------------------------------------------------------------------- import


@dataclass
class HFImportInfo:
    config: GPTConfig
    added_tokens: list[str]  # special tokens gptctl added to the HF tokenizer
    resized_from: int | None  # the embedding's row count before growing it, if it grew


def _load_hf_tokenizer(directory: Path) -> Tokenizer:
    if (directory / TOKENIZER_FILE).is_file():
        return Tokenizer.from_str((directory / TOKENIZER_FILE).read_text(encoding="utf-8"))
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if vocab.is_file() and merges.is_file():  # a "slow" GPT-2 tokenizer: same byte-level BPE
        tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(EOS_TOKEN) is not None:
            tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
        return tok
    raise HFFormatError(f"{directory}: no tokenizer.json (or vocab.json + merges.txt) found")


def _ensure_special_tokens(tok: Tokenizer, n_rows: int, resize_embeddings: bool) -> tuple[list[str], int]:
    """Add <|pad|> if missing; returns (added tokens, rows the embedding needs)."""
    if tok.token_to_id(EOS_TOKEN) is None:
        raise HFFormatError(
            f"the HF tokenizer has no {EOS_TOKEN!r} token; gptctl marks document ends with it "
            "(GPT-2 tokenizers have it). Add it to the tokenizer and the embedding first."
        )
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])  # idempotent
    added: list[str] = []
    if tok.token_to_id(PAD_TOKEN) is None:
        new_id = tok.get_vocab_size(with_added_tokens=True)
        if new_id >= n_rows and not resize_embeddings:
            raise HFFormatError(
                f"the HF tokenizer has no {PAD_TOKEN!r} token and the embedding ({n_rows} rows) has no "
                f"spare row for it (it would get id {new_id}); import with resize_embeddings=True to grow "
                "the embedding, or add the token yourself"
            )
        tok.add_special_tokens([AddedToken(PAD_TOKEN, special=True, normalized=False)])
        added.append(PAD_TOKEN)
    needed = max(n_rows, tok.get_vocab_size(with_added_tokens=True))
    if needed > n_rows and not resize_embeddings:
        raise HFFormatError(
            f"the tokenizer has {needed} tokens but the embedding only {n_rows} rows; import with "
            "resize_embeddings=True to grow the embedding"
        )
    return added, needed


def import_hf_dir(hf_dir: str | Path, out_dir: str | Path, *, resize_embeddings: bool = True) -> HFImportInfo:
    """Local HF GPT-2 directory -> local gptctl checkpoint (model.safetensors, config.json, tokenizer.json)."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / CONFIG_FILE
    if not config_path.is_file():
        raise HFFormatError(f"{hf_dir}: no config.json; expected a Hugging Face GPT-2 directory")
    hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    config = gpt_config_from_hf(hf_config)
    tensors = hf_to_gptctl_state_dict(read_hf_weights(hf_dir), config)
    tok = _load_hf_tokenizer(hf_dir)
    added, rows = _ensure_special_tokens(tok, config.vocab_size, resize_embeddings)
    resized_from = None
    if rows > config.vocab_size:
        resized_from = config.vocab_size
        new_rows = -(-rows // 64) * 64  # multiple of 64, like gptctl's padded vocab
        wte = tensors[EMBEDDING_KEY]
        extra = wte.mean(dim=0, keepdim=True).expand(new_rows - wte.shape[0], -1)
        tensors[EMBEDDING_KEY] = torch.cat([wte, extra], dim=0).contiguous()
        config = GPTConfig.from_dict({**config.to_dict(), "vocab_size": new_rows})
    tokenizer = GPTTokenizer(tok)
    save_pretrained(out_dir, state_dict_for_saving(tensors), config, tokenizer)
    return HFImportInfo(config=config, added_tokens=added, resized_from=resized_from)
