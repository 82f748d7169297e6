"""MLflow "model from code" for a gptctl checkpoint: no pickled Python object is stored.

Logged by orchestrator/registry/models.py; MLflow runs this file on load and finds the model
through `set_model`. The weights come from the checkpoint's safetensors artifact.
"""
from __future__ import annotations

from typing import Any

import mlflow.pyfunc
from mlflow.models import set_model


class GPTTextGenerator(mlflow.pyfunc.PythonModel):
    """A list of prompts in, a list of completions out (greedy unless a temperature is given)."""

    def load_context(self, context) -> None:
        from model import GPTTokenizer, load_pretrained, use_decode_layout

        directory = context.artifacts["checkpoint"]
        self.model = use_decode_layout(load_pretrained(directory))
        self.tokenizer = GPTTokenizer.load(directory)

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        from model import SamplingParams, generate

        params = params or {}
        sampling = SamplingParams(
            max_new_tokens=int(params.get("max_tokens", 32)),
            temperature=float(params.get("temperature", 0.0)),
            stop_token_ids=(self.tokenizer.eos_id,),
        )
        return [self.tokenizer.decode(generate(self.model, self.tokenizer.encode(p), sampling)) for p in model_input]


set_model(GPTTextGenerator())
