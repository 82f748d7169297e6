"""Task evaluation: does the model give the right answer, not only a low loss?

Greedy answers to an eval set of prompt/response pairs, scored the way SQuAD scores them:
exact match and token F1 after normalising both texts (lowercase, no punctuation, no
articles, single spaces). The scoring is hand-written rather than taken from a library:
it is twenty lines, and the libraries that carry it (HF `evaluate`, `torchmetrics`) would
add a dependency tree, and want SQuAD-shaped records, for those twenty lines.

Used by the training loop (workers/train_loop.py) at every eval, and by benchmarks.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.batching import BatchEngine, CollectingSink
from model.gpt import GPT
from model.sampling import SamplingParams
from model.tokenizer import GPTTokenizer

__all__ = ["TaskScores", "evaluate_on_ranks", "normalize_answer", "exact_match", "token_f1", "score_answers", "generate_answers",
           "evaluate_pairs", "TABLE_COLUMNS"]

TABLE_COLUMNS = ("prompt", "expected", "generated", "exact_match", "f1")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, punctuation and articles removed, whitespace collapsed."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def token_f1(prediction: str, truth: str) -> float:
    """Harmonic mean of token precision and recall over the normalised words (bag of words)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not predicted or not expected:  # SQuAD: two empty answers agree, one empty one scores 0
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@dataclass
class TaskScores:
    """Mean scores over the rows, and the rows themselves (one dict per pair, TABLE_COLUMNS keys)."""

    exact_match: float
    f1: float
    rows: list[dict] = field(default_factory=list)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}exact_match": self.exact_match, f"{prefix}f1": self.f1}

    def table(self) -> dict[str, list]:
        """Column-wise, as mlflow's log_table takes it."""
        return {column: [row[column] for row in self.rows] for column in TABLE_COLUMNS}


def score_answers(prompts: Sequence[str], expected: Sequence[str], generated: Sequence[str]) -> TaskScores:
    return _mean_scores([{"prompt": p, "expected": e, "generated": g, "exact_match": exact_match(g, e),
                          "f1": token_f1(g, e)} for p, e, g in zip(prompts, expected, generated, strict=True)])


def _mean_scores(rows: list[dict]) -> TaskScores:
    n = max(len(rows), 1)
    return TaskScores(sum(r["exact_match"] for r in rows) / n, sum(r["f1"] for r in rows) / n, rows)


def generate_answers(model: GPT, tokenizer: GPTTokenizer, inputs: Sequence[str], max_new_tokens: int = 32,
                     max_batch_size: int = 32) -> list[str]:
    """Greedy completions of each input text, decoded; generation stops at eos (the end of a
    fine-tuning row) or after max_new_tokens.

    Decoded together through the serving engine's continuous batching (model/batching.py),
    without its batch-invariance padding: greedy answers for a score, not bit-reproducible
    streams. An input longer than the context keeps its last tokens (the data preparation
    cuts fine-tuning prompts from the left too). The model's train/eval flag is restored.
    """
    block = model.config.block_size
    room = max(block // 2, block - max_new_tokens)  # prompt tokens kept, leaving room for the answer
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(tokenizer.eos_id,))
    was_training = model.training
    engine = BatchEngine(model, max_batch_size=max_batch_size, batch_invariant=False)
    sinks = []
    try:
        for ids in tokenizer.encode_batch(list(inputs)):
            sink = CollectingSink()
            engine.submit((ids or [tokenizer.eos_id])[-room:], params, sink)
            sinks.append(sink)
        engine.run_until_idle()
    finally:
        model.train(was_training)
    for sink in sinks:
        if sink.error is not None:
            raise sink.error
    return [tokenizer.decode(sink.tokens) for sink in sinks]


@torch.no_grad()
def evaluate_pairs(model: GPT, tokenizer: GPTTokenizer, pairs: Sequence[dict], prompt_template: str = "{prompt}",
                   max_new_tokens: int = 32) -> TaskScores:
    """Score greedy answers to ``[{"prompt", "response"}, ...]``; each prompt is put through
    ``prompt_template`` first (fine-tuned models expect the template their data used)."""
    prompts = [pair["prompt"] for pair in pairs]
    generated = generate_answers(model, tokenizer, [prompt_template.format(prompt=p) for p in prompts],
                                 max_new_tokens)
    return score_answers(prompts, [pair["response"] for pair in pairs], generated)


def _full_model(module: GPT, zero3: bool) -> GPT:
    """A plain GPT with every weight, for generation. Under ZeRO 0-2 that is the module itself. Under
    ZeRO-3 each rank holds a shard and the module's forward hooks all-gather per layer, so ranks
    decoding different prompts would deadlock: the weights are gathered once on every rank and
    copied into an unhooked model (built on the meta device, so it costs no init and no RNG draws)."""
    if not zero3:
        return module
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        weights = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    if any("lora_" in name for name in weights):  # train.lora: generate with the adapters folded in
        from model.lora import merged_weights

        weights = merged_weights(module, weights)
    with torch.device("meta"):
        copy = GPT(module.config)
    copy.load_state_dict(weights, assign=True)
    copy.lm_head.weight = copy.transformer.wte.weight  # assign=True loaded the tied pair as two tensors
    return copy.eval()


def evaluate_on_ranks(module: GPT, tokenizer: GPTTokenizer, eval_set: dict, rank: int, world_size: int,
                      zero3: bool = False) -> TaskScores | None:
    """Every rank answers its slice of the pairs (rank r takes r, r+W, ...); rank 0 gets the scores of
    all of them in the set's order, the other ranks None. Every rank must call it (collectives).

    ``eval_set``: ``{"rows": [{"prompt", "response"}], "prompt_template": str, "max_new_tokens": int}``
    as the controller builds it (orchestrator/jobs/controller.py)."""
    import torch.distributed as dist

    rows = eval_set["rows"]
    model = _full_model(module, zero3)
    mine = evaluate_pairs(model, tokenizer, rows[rank::world_size], eval_set["prompt_template"],
                          eval_set["max_new_tokens"]).rows
    if world_size > 1 and dist.is_initialized():
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    if rank != 0:
        return None
    ordered: list = [None] * len(rows)
    for r, part in enumerate(gathered):
        ordered[r::world_size] = part
    return _mean_scores(ordered)
