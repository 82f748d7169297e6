"""`logprobs` for /v1/completions, in the shape of OpenAI's legacy completions API.

    choices[i].logprobs = {"tokens": [str], "token_logprobs": [float | null],
                           "top_logprobs": [{str: float} | null], "text_offset": [int]}

one entry per returned token: the echoed prompt's tokens (with `echo`), then the completion's.
A token's log-probability is log softmax of the model's logits at the position before it; the
first token of a sequence has none (null), as in OpenAI's answers. top_logprobs holds the N
likeliest tokens at that position plus the token actually there (so N+1 entries when it is not
among them). text_offset is where the token's text starts in the choice's `text`.

The values come from one forward pass over prompt + completion after generation (teacher
forcing) rather than from the decode steps: the batch engine streams token ids only, and one
extra pass costs less than a prompt's prefill did. They are the model's own distribution, before
temperature / top-k / top-p, which is what lm-eval-harness and similar scorers expect.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model import GPT, GPTTokenizer


@torch.inference_mode()
def token_logprobs(model: GPT, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] fp32 log-probabilities: row t is the distribution of ids[t] given ids[:t] (row 0 unused)."""
    idx = torch.tensor([ids], dtype=torch.long, device=model.transformer.wte.weight.device)
    logits, _ = model(idx)
    logprobs = F.log_softmax(logits[0].float(), dim=-1).cpu()
    return torch.cat([torch.zeros_like(logprobs[:1]), logprobs[:-1]])


def completion_logprobs(model: GPT, tokenizer: GPTTokenizer, prompt_ids: list[int], completion_ids: list[int],
                        echo_text: str | None, top_n: int) -> dict:
    """The `logprobs` object of one choice whose text is (echo_text or "") + the completion's text.

    echo_text None: only the completion's tokens are listed. completion_ids are the tokens the
    choice returned (see kept_completion_ids), ending with the stop token if one ended it.
    """
    ids = list(prompt_ids) + list(completion_ids)
    rows = token_logprobs(model, ids)
    echo = echo_text is not None
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in range(0 if echo else len(prompt_ids), len(ids)):
        if t < len(prompt_ids):
            offset = len(tokenizer.decode(prompt_ids[:t]))
        else:  # a prefix's decoded length: a byte-level token may hold part of a character
            offset = (len(echo_text) if echo else 0) + len(tokenizer.decode(completion_ids[: t - len(prompt_ids)]))
        out["tokens"].append(tokenizer.decode([ids[t]]))
        out["text_offset"].append(offset)
        if t == 0:  # nothing before the first token to condition on
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        row = rows[t]
        top = {}
        if top_n > 0:
            values, indices = torch.topk(row, min(top_n, row.numel()))
            top = {tokenizer.decode([int(i)]): v.item() for v, i in zip(values, indices)}
        top.setdefault(tokenizer.decode([ids[t]]), row[ids[t]].item())
        out["token_logprobs"].append(row[ids[t]].item())
        out["top_logprobs"].append(top)
    return out


def kept_completion_ids(tokenizer: GPTTokenizer, generated: list[int], text: str, cut_by_stop_string: bool,
                        stop_token: int | None) -> list[int]:
    """The completion tokens a choice reports: those whose text starts before a stop string cut
    it (all of them otherwise), then the stop token that ended the generation, if one did."""
    kept = list(generated)
    if cut_by_stop_string:
        kept = [tok for j, tok in enumerate(generated) if len(tokenizer.decode(generated[:j])) < len(text)]
    if stop_token is not None:
        kept.append(stop_token)
    return kept
