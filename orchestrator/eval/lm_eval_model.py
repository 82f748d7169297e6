"""gptctl's model as an lm-eval-harness model (`--model gptctl`), evaluated in this process.

lm-eval asks a model three things; each is answered in batches:
  loglikelihood          one forward pass per batch of (context, continuation) token rows,
                         right-padded (the attention is causal, so padding after a row's last
                         token never changes its logits)
  loglikelihood_rolling  a document split into lm-eval's own disjoint rolling windows of
                         block_size tokens, scored like loglikelihood, summed per document
  generate_until         model.batching.BatchEngine: the prompts decode together, each with its
                         own KV cache, greedy unless the task asks to sample; the serving code's
                         TextAssembler applies the stop strings, so text is cut exactly as
                         /v1/completions cuts it
Contexts longer than the model's context are truncated on the left, as lm-eval's HF model does.

Importing this module registers the model name "gptctl" with lm-eval (lm-eval is the optional
`eval` extra: pip install 'gptctl[eval]').
"""
from __future__ import annotations

import json
from pathlib import Path

import lm_eval.models  # noqa: F401  lm-eval fills its model registry on first use only while it is empty:
import torch  # registering "gptctl" first would hide its own models (local-completions, hf, ...)
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from model import GPT, GPTTokenizer, load_pretrained
from model.batching import BatchEngine
from model.sampling import SamplingParams
from orchestrator.serve.text import TextAssembler

TokenRequest = tuple[object, list[int], list[int]]  # (cache key, context ids, continuation ids)


def local_checkpoint(target: str, tracking_uri: str | None = None) -> str:
    """A local directory holding the serving files of a checkpoint dir, s3:// URI or models:/ URI
    (a LoRA checkpoint: its merged model, as serving has it)."""
    from orchestrator.registry.lora import local_serving_dir
    from orchestrator.registry.models import is_registry_uri, resolve_model_uri
    from workers import storage

    if is_registry_uri(target):
        from orchestrator.runs import resolve_tracking_uri

        return resolve_model_uri(target, resolve_tracking_uri(tracking_uri))
    if not storage.is_s3(target) and not Path(target, "config.json").is_file():
        raise FileNotFoundError(f"{target}: not a gptctl checkpoint directory (no config.json)")
    return local_serving_dir(target)


def checkpoint_run_id(directory: str) -> str | None:
    """The MLflow run that trained this checkpoint (trainer_state.json), if it says."""
    path = Path(directory, "trainer_state.json")
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("mlflow_run_id")


class _GenerationSink:
    """One prompt's output: tokens through the serving TextAssembler, which stops at `until`."""

    def __init__(self, tokenizer: GPTTokenizer, until: list[str]) -> None:
        self.text = TextAssembler(tokenizer, until, incremental=True)
        self.error: BaseException | None = None

    def on_token(self, token_id: int) -> bool:
        self.text.push(token_id)
        return not self.text.stopped

    def on_finish(self, reason: str, error: BaseException | None) -> None:
        self.text.flush()
        self.error = error


@register_model("gptctl")
class GPTCtlLM(TemplateLM):
    """lm-eval model over a gptctl checkpoint (model_args: checkpoint=DIR|s3://…|models:/…)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        model: GPT | None = None,
        tokenizer: GPTTokenizer | None = None,
        batch_size: int | str = 8,
        device: str | None = "cpu",
        max_gen_toks: int = 256,
        tracking_uri: str | None = None,
        **_ignored,  # what lm-eval adds when it builds a model from a name (max_batch_size, ...)
    ) -> None:
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("model_args: pass checkpoint=DIR (a gptctl checkpoint, s3:// or models:/ URI)")
            local = local_checkpoint(str(checkpoint), tracking_uri)
            model, tokenizer = load_pretrained(local, device=device or "cpu"), GPTTokenizer.load(local)
        if tokenizer is None:
            raise ValueError("a model passed in needs its tokenizer too")
        self.model, self.tok = model.eval(), tokenizer
        # lm-eval passes batch_size as its command line gave it; "auto" (probe memory) falls back to 8
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)

    # ---- what lm-eval reads --------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        # documents in gptctl's training data are separated by <|endoftext|>: an empty
        # context (or a rolling window's start) is conditioned on it, as for GPT-2
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def tokenizer_name(self) -> str:
        return f"gptctl-{self.tok.sha256[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    # ---- scoring -------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding produces it)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # longest first, so a batch's rows have similar lengths (less padding)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, answer in zip(batch, self._score_batch([requests[i] for i in batch])):
                results[i] = answer
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_batch(self, requests: list[TokenRequest]) -> list[tuple[float, bool]]:
        rows, spans = [], []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("lm-eval sent an empty continuation to score")
            # the model sees every token but the last; left-truncate to the context length
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            row = whole[:-1]
            rows.append(row)
            spans.append((len(row) - len(continuation), continuation))
        width = max(len(r) for r in rows)
        idx = torch.full((len(rows), width), self.tok.pad_id, dtype=torch.long)
        for b, row in enumerate(rows):
            idx[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        logits, _ = self.model(idx.to(self.device))
        logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
        out = []
        for b, (first, continuation) in enumerate(spans):
            target = torch.tensor(continuation, dtype=torch.long)
            window = logprobs[b, first : first + len(continuation)]
            score = window.gather(1, target[:, None]).sum().item()
            greedy = bool((window.argmax(dim=-1) == target).all())
            out.append((score, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A document's total log-probability: disjoint windows, each at most block_size tokens."""
        windows: list[TokenRequest] = []
        owner: list[int] = []
        for n, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (score, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ----------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """All prompts decode together through one BatchEngine (KV cache per sequence)."""
        engine = BatchEngine(self.model, max_batch_size=self.batch_size, batch_invariant=False)
        sinks = []
        for request in requests:
            context, gen_kwargs = request.args
            params, until = self._generation_params(dict(gen_kwargs))
            # leave room for the answer: keep the context's last (block_size - max_new) tokens
            keep = max(1, self.max_length - params.max_new_tokens)
            prompt = (self.tok_encode(context) or [self.prefix_token_id])[-keep:]
            sink = _GenerationSink(self.tok, until)
            engine.submit(prompt, params, sink)
            sinks.append(sink)
        engine.run_until_idle()
        for sink in sinks:
            if sink.error is not None:
                raise sink.error
        texts = [sink.text.text for sink in sinks]
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def _generation_params(self, gen_kwargs: dict) -> tuple[SamplingParams, list[str]]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eos_text = self.tok.decode([self.tok.eos_id])
        if eos_text not in until:
            until.append(eos_text)
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 0.0)) if do_sample else 0.0
        top_p = gen_kwargs.pop("top_p", None)
        top_k = gen_kwargs.pop("top_k", None)
        seed = gen_kwargs.pop("seed", None)
        params = SamplingParams(
            max_new_tokens=min(max_new, self.max_length - 1), temperature=temperature,
            top_p=None if top_p is None or not do_sample else float(top_p),
            top_k=None if top_k is None or not do_sample else int(top_k),
            seed=None if seed is None else int(seed), stop_token_ids=(self.tok.eos_id,),
        )
        return params, until
