"""The Ray Serve application: a FastAPI ingress over one GPT checkpoint."""
# no `from __future__ import annotations`: FastAPI must see the request model classes, not strings

import os
import tempfile
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

api = FastAPI(title="gptctl", description="Text generation from a gptctl checkpoint")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=100_000)
    max_tokens: int = Field(default=64, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0, description="0 = greedy")
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    use_template: bool | None = Field(
        default=None, description="wrap the prompt in the fine-tuning template; default: when the checkpoint was fine-tuned"
    )


class GenerateResponse(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of text) or "length"
    latency_ms: float


def _local_checkpoint(checkpoint: str) -> str:
    """Serving reads only the safetensors/config/tokenizer files; fetch them if remote."""
    from workers import storage

    if not storage.is_s3(checkpoint):
        return checkpoint
    local = tempfile.mkdtemp(prefix="gptctl-serve-")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json"):
        uri = storage.join(checkpoint, name)
        if storage.exists(uri):
            storage.write_bytes(str(Path(local, name)), storage.read_bytes(uri))
    return local


@serve.deployment
@serve.ingress(api)
class GPTServer:
    def __init__(self, checkpoint: str, env: dict[str, str] | None = None):
        import json

        import torch

        from model import GPTTokenizer, load_pretrained

        os.environ.update(env or {})
        torch.set_num_threads(max(1, int(os.environ.get("GPTCTL_SERVE_THREADS", "1"))))
        self.checkpoint = checkpoint
        local = _local_checkpoint(checkpoint)
        self.model = load_pretrained(local).eval()
        self.tokenizer = GPTTokenizer.load(local)
        state_path = Path(local, "trainer_state.json")
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        self.fine_tuned = state.get("kind") == "finetune"

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "checkpoint": self.checkpoint, "context": self.model.config.block_size}

    @api.post("/generate", response_model=GenerateResponse)
    def generate(self, request: GenerateRequest) -> GenerateResponse:
        from model import SamplingParams, generate
        from orchestrator.data.prepare import format_prompt

        started = time.perf_counter()
        use_template = self.fine_tuned if request.use_template is None else request.use_template
        text = format_prompt(request.prompt) if use_template else request.prompt
        prompt_ids = self.tokenizer.encode(text)
        context = self.model.config.block_size
        if not prompt_ids:
            raise HTTPException(status_code=400, detail="prompt: must encode to at least one token")
        if len(prompt_ids) >= context:
            raise HTTPException(
                status_code=400,
                detail=f"prompt: {len(prompt_ids)} tokens; the model's context is {context} tokens including the completion",
            )
        params = SamplingParams(
            max_new_tokens=min(request.max_tokens, context - len(prompt_ids)),
            temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
            seed=request.seed, stop_token_ids=(self.tokenizer.eos_id,),
        )
        new_ids = generate(self.model, prompt_ids, params)
        finish = "length" if len(new_ids) >= params.max_new_tokens else "stop"
        return GenerateResponse(
            text=self.tokenizer.decode(new_ids), prompt_tokens=len(prompt_ids),
            completion_tokens=len(new_ids), finish_reason=finish,
            latency_ms=(time.perf_counter() - started) * 1000,
        )
