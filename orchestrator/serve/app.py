"""The Ray Serve application: an OpenAI-compatible FastAPI ingress over one GPT checkpoint.

Endpoints (relative to the app's route prefix):
  POST /v1/completions        OpenAI completions; `stream: true` answers server-sent events
  POST /v1/chat/completions   OpenAI chat; the last user message rendered with format_prompt
  GET  /v1/models             the one model this app serves
  POST /generate              gptctl's original endpoint (unchanged request/response)
  GET  /healthz               liveness + engine counters (never needs the API key)

All generation goes through one `model.batching.BatchEngine` per replica: concurrent requests
share each decode forward pass, each with its own KV cache, sampling parameters and seed.
"""
# no `from __future__ import annotations`: FastAPI must see the request model classes, not strings

import asyncio
import inspect
import json
import os
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from orchestrator.ray_runtime import forwarded_env
from orchestrator.serve import guard
from orchestrator.serve.deployment import deployment_options, resolve_api_key, serve_options
from orchestrator.serve.guard import BodyTooLarge, GuardMiddleware
from orchestrator.serve.options import MAX_SEED, ServeOptions
from orchestrator.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    envelope,
    new_id,
    parse_json_body,
    render_chat,
    sse,
    usage,
    validate_request,
)
from orchestrator.serve.text import TextAssembler
from orchestrator.spec import DeploySpec, parse_spec

api = FastAPI(title="gptctl", description="Text generation from a gptctl checkpoint (OpenAI-compatible)")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

api.add_middleware(GuardMiddleware)


@api.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(BodyTooLarge)
async def _too_large(request: Request, error: BodyTooLarge) -> JSONResponse:
    return JSONResponse(ApiError(413, error.detail).body(), status_code=413)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, error: RequestValidationError) -> Response:
    # FastAPI's own handler echoes the input as UTF-8 and fails (500) on an unpaired surrogate
    body = json.dumps({"detail": jsonable_encoder(error.errors())}, ensure_ascii=True, default=repr)
    return Response(body, status_code=422, media_type="application/json")


@api.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    message = f"internal error: {type(error).__name__}"
    return JSONResponse(ApiError(500, message, type="server_error").body(), status_code=500)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=100_000)
    max_tokens: int = Field(default=64, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0, description="0 = greedy")
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1, description="any seed torch accepts")
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
    """Serving reads only the safetensors/config/tokenizer files; a LoRA checkpoint is merged into
    its base here, once per replica: decoding then costs what a full fine-tune's does."""
    from orchestrator.registry.lora import local_serving_dir

    return local_serving_dir(checkpoint)


class _Choice:
    """One sequence's sink (runs on the engine thread) → events on the request's asyncio queue."""

    def __init__(self, index: int, generation: "_Generation", stop: list[str]) -> None:
        self.index = index
        self.generation = generation
        self.text = TextAssembler(generation.tokenizer, stop, incremental=generation.stream)
        self.request_id: int | None = None
        self.finished = False
        self.finish_reason: str | None = None
        self.error: BaseException | None = None

    def on_token(self, token_id: int) -> bool:
        delta = self.text.push(token_id)
        if delta and self.generation.stream:
            self.generation.post(("delta", self.index, delta))
        return not self.text.stopped

    def on_finish(self, reason: str, error: BaseException | None) -> None:
        tail = self.text.flush()
        self.finish_reason, self.error = reason, error
        self.finished = True
        self.generation.post(("finish", self.index, tail))


class _Generation:
    """The sequences of one HTTP request; cancel() frees whatever has not finished."""

    def __init__(self, engine, tokenizer, stream: bool) -> None:
        self.engine, self.tokenizer, self.stream = engine, tokenizer, stream
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list[_Choice] = []

    def post(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass  # the request's event loop is gone; nobody is listening

    def submit(self, prompt_ids: list[int], params, stop: list[str]) -> _Choice:
        choice = _Choice(len(self.choices), self, stop)
        self.choices.append(choice)
        choice.request_id = self.engine.submit(prompt_ids, params, choice)
        return choice

    async def events(self):
        pending = len(self.choices)  # every choice posts exactly one finish event
        while pending:
            event = await self.queue.get()
            if event[0] == "finish":
                pending -= 1
            yield event

    async def wait(self) -> None:
        async for _ in self.events():
            pass

    def cancel(self) -> None:
        for choice in self.choices:
            if not choice.finished and choice.request_id is not None:
                self.engine.cancel(choice.request_id)


class _Job:
    """One prompt of a request, validated and fitted to the context."""

    def __init__(self, ids: list[int], max_new: int, echo_text: str = "") -> None:
        self.ids, self.max_new, self.echo_text = ids, max_new, echo_text


@serve.deployment
@serve.ingress(api)
class GPTServer:
    def __init__(self, checkpoint: str, env: dict[str, str] | None = None, options: dict | None = None):
        import torch

        from model import GPTTokenizer, load_pretrained, use_decode_layout
        from model.batching import BatchEngine

        os.environ.update(env or {})
        self.options = opts = ServeOptions.from_dict(options)
        threads = int(os.environ.get("GPTCTL_SERVE_THREADS", opts.num_threads))
        torch.set_num_threads(max(1, threads))
        self.checkpoint = checkpoint
        local = _local_checkpoint(checkpoint)
        device = opts.device if opts.device == "cpu" or torch.cuda.is_available() else "cpu"
        self.model = use_decode_layout(load_pretrained(local, device=device))  # eval mode already
        self.tokenizer = GPTTokenizer.load(local)
        state_path = Path(local, "trainer_state.json")
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        self.fine_tuned = state.get("kind") == "finetune"
        block = self.model.config.block_size
        self.context = min(opts.max_context or block, block)
        self.max_tokens_limit = min(opts.max_tokens_limit or self.context, self.context)
        self.model_id = opts.model_id
        self.created = int(time.time())
        self.engine = BatchEngine(
            self.model, max_batch_size=opts.max_batch_size, prefill_token_budget=opts.prefill_token_budget,
            batch_invariant=opts.batch_invariant,
        ).start()
        # through the module object: this class is pickled by value, its globals would be copies
        guard.configure(opts.api_key_sha256, opts.max_request_bytes)

    def check_health(self) -> None:
        """Serve calls this periodically; a dead engine thread makes Serve replace the replica."""
        if not self.engine.alive:
            raise RuntimeError("the batch engine thread is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(timeout=5.0)

    # ---- plain endpoints -----------------------------------------------------------------
    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "checkpoint": self.checkpoint, "context": self.context, "model": self.model_id,
                "replica_pid": os.getpid(), "engine": self.engine.stats()}

    @api.get("/v1/models")
    def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    @api.get("/v1/models/{model_id}")
    def model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return self._model_card()

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "gptctl",
                "max_model_len": self.context}

    @api.post("/generate", response_model=GenerateResponse)
    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        from model import SamplingParams
        from orchestrator.data.prepare import format_prompt

        started = time.perf_counter()
        use_template = self.fine_tuned if request.use_template is None else request.use_template
        text = format_prompt(request.prompt) if use_template else request.prompt
        try:
            prompt_ids = self.tokenizer.encode(text)
        except Exception:  # e.g. an unpaired surrogate: valid JSON, not valid Unicode
            raise HTTPException(status_code=400, detail="prompt: not valid Unicode text") from None
        if not prompt_ids:
            raise HTTPException(status_code=400, detail="prompt: must encode to at least one token")
        if len(prompt_ids) >= self.context:
            raise HTTPException(
                status_code=400,
                detail=f"prompt: {len(prompt_ids)} tokens; the model's context is {self.context} tokens including the completion",
            )
        params = SamplingParams(
            max_new_tokens=min(request.max_tokens, self.max_tokens_limit, self.context - len(prompt_ids)),
            temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
            seed=request.seed, stop_token_ids=(self.tokenizer.eos_id,),
        )
        generation = _Generation(self.engine, self.tokenizer, stream=False)
        try:
            choice = generation.submit(prompt_ids, params, [])
            await generation.wait()
        finally:
            generation.cancel()
        if choice.finish_reason == "error":
            raise HTTPException(status_code=500, detail=f"generation failed: {choice.error}")
        n = choice.text.num_tokens
        return GenerateResponse(
            text=choice.text.text, prompt_tokens=len(prompt_ids), completion_tokens=n,
            finish_reason="length" if n >= params.max_new_tokens else "stop",
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    # ---- OpenAI-compatible ---------------------------------------------------------------
    @api.post("/v1/completions")
    async def completions(self, request: Request):
        from orchestrator.data.prepare import format_prompt

        req = validate_request(parse_json_body(await request.body()), CompletionRequest)
        self._check_model(req.model)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ApiError(400, "prompt: must not be empty", param="prompt")
        if req.logprobs is not None and req.stream:
            raise ApiError(400, "logprobs: not available with stream: true; send stream: false", param="logprobs")
        if req.echo and req.max_tokens == 0:  # OpenAI: score the prompt only, generate nothing
            max_tokens = 0
        else:
            max_tokens = self._max_tokens(req.max_tokens, self.options.default_max_tokens)
        self._check_choices(len(prompts), req.n)
        jobs = []
        for prompt in prompts:
            if isinstance(prompt, str):
                text = format_prompt(prompt) if req.use_template else prompt
                ids = self.tokenizer.encode(text) or [self.tokenizer.eos_id]  # "" starts a new document
                echo = prompt
            else:
                ids = self._check_token_ids(prompt)
                echo = self.tokenizer.decode(ids)
            jobs.append(self._fit(ids, max_tokens, req.truncate_prompt_tokens, echo if req.echo else ""))
        return await self._respond("text_completion", req, jobs)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        from orchestrator.data.prepare import format_prompt

        req = validate_request(parse_json_body(await request.body()), ChatRequest)
        self._check_model(req.model)
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one", param="max_tokens")
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._max_tokens(requested, self.max_tokens_limit)
        self._check_choices(1, req.n)
        ids = self.tokenizer.encode(render_chat(req.messages, format_prompt))
        return await self._respond("chat.completion", req, [self._fit(ids, max_tokens, req.truncate_prompt_tokens)])

    # ---- helpers ---------------------------------------------------------------------------
    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise ApiError(404, f"the model '{name}' does not exist; this endpoint serves '{self.model_id}'",
                           param="model", code="model_not_found")

    def _max_tokens(self, requested: int | None, default: int) -> int:
        if requested is None:
            return min(default, self.max_tokens_limit)
        if not 1 <= requested <= self.max_tokens_limit:
            raise ApiError(400, f"max_tokens: must be between 1 and {self.max_tokens_limit} "
                                f"(this server's limit), got {requested}", param="max_tokens")
        return requested

    def _check_choices(self, n_prompts: int, n: int) -> None:
        if n_prompts * n > self.options.max_choices:
            raise ApiError(400, f"n: {n_prompts} prompt(s) x n={n} exceeds this server's limit of "
                                f"{self.options.max_choices} choices per request", param="n")

    def _check_token_ids(self, ids: list[int]) -> list[int]:
        vocab = self.model.config.vocab_size
        if not ids:
            raise ApiError(400, "prompt: a token-id prompt must not be empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"prompt: token id(s) {bad[:5]} outside the vocabulary [0, {vocab})", param="prompt")
        return ids

    def _fit(self, ids: list[int], max_tokens: int, truncate: int | None, echo: str = "") -> _Job:
        """Left-truncate when asked; refuse a prompt that leaves no room; clamp max_tokens to what fits."""
        if truncate is not None:
            keep = max(1, self.context - max_tokens) if truncate == -1 else truncate
            ids = ids[-keep:]
        longest = self.context - (1 if max_tokens else 0)  # max_tokens 0 (echo): the prompt alone may fill it
        if len(ids) > longest:
            raise ApiError(
                400, f"prompt: {len(ids)} tokens, but this model's context is {self.context} tokens "
                     f"(prompt + completion), so a prompt may have at most {longest}; shorten it "
                     "or pass truncate_prompt_tokens to keep only its end", param="prompt",
                code="context_length_exceeded")
        return _Job(ids, min(max_tokens, self.context - len(ids)), echo)

    def _sampling(self, req, job: _Job, j: int):
        from model import SamplingParams

        seed = None if req.seed is None else (req.seed + j) % (MAX_SEED + 1)  # choice j of n: seed + j
        return SamplingParams(
            max_new_tokens=job.max_new, temperature=req.temperature, top_k=req.top_k,
            top_p=None if req.top_p >= 1.0 else req.top_p, seed=seed,
            stop_token_ids=(self.tokenizer.eos_id,),
        )

    def _start(self, generation: _Generation, req, jobs: list[_Job]) -> None:
        for job in jobs:
            for j in range(req.n):
                generation.submit(job.ids, self._sampling(req, job, j), req.stop)

    def _finish_reason(self, choice: _Choice) -> str:
        return "length" if choice.finish_reason == "length" else "stop"

    async def _respond(self, kind: str, req, jobs: list[_Job]):
        request_id = new_id("chatcmpl" if kind == "chat.completion" else "cmpl")
        prompt_tokens = sum(len(job.ids) for job in jobs)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(kind, request_id, req, jobs, prompt_tokens, include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        generation = _Generation(self.engine, self.tokenizer, stream=False)
        try:
            self._start(generation, req, jobs)
            await generation.wait()
        finally:
            generation.cancel()
        failed = [c for c in generation.choices if c.finish_reason == "error"]
        if failed:
            raise ApiError(500, f"generation failed: {failed[0].error}", type="server_error")
        choices = []
        for choice in generation.choices:
            echo = jobs[choice.index // req.n].echo_text
            if kind == "chat.completion":
                choices.append({"index": choice.index, "message": {"role": "assistant", "content": choice.text.text},
                                "logprobs": None, "finish_reason": self._finish_reason(choice)})
            else:
                logprobs = None
                if req.logprobs is not None:
                    logprobs = await asyncio.to_thread(self._logprobs, req, jobs[choice.index // req.n], choice)
                choices.append({"index": choice.index, "text": echo + choice.text.text, "logprobs": logprobs,
                                "finish_reason": self._finish_reason(choice)})
        body = envelope(kind, request_id, self.model_id, choices)
        body["usage"] = usage(prompt_tokens, sum(c.text.num_tokens for c in generation.choices))
        return JSONResponse(body)

    def _logprobs(self, req, job: _Job, choice: _Choice) -> dict:
        """OpenAI's choices[].logprobs for one completion (see orchestrator/serve/logprobs.py)."""
        from orchestrator.serve.logprobs import completion_logprobs, kept_completion_ids

        # "stop" without a stop string means the stop token ended it: OpenAI lists that token too
        stop_token = self.tokenizer.eos_id if choice.finish_reason == "stop" and not choice.text.stopped else None
        kept = kept_completion_ids(self.tokenizer, choice.text.token_ids, choice.text.text, choice.text.stopped,
                                   stop_token)
        return completion_logprobs(self.model, self.tokenizer, job.ids, kept,
                                   job.echo_text if req.echo else None, req.logprobs)

    async def _stream(self, kind: str, request_id: str, req, jobs: list[_Job], prompt_tokens: int,
                      include_usage: bool):
        chat = kind == "chat.completion"
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": text or ""} if first else (
                    {"content": text} if text else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            body = envelope(chunk_kind, request_id, self.model_id, [choice], created)
            if include_usage:
                body["usage"] = None
            return sse(body)

        generation = _Generation(self.engine, self.tokenizer, stream=True)
        try:
            try:
                self._start(generation, req, jobs)
            except Exception as error:  # validated already; defensive
                yield sse(ApiError(500, f"generation failed: {error}", type="server_error").body())
                yield sse("[DONE]")
                return
            for choice in generation.choices:
                echo = jobs[choice.index // req.n].echo_text
                if chat or echo:
                    yield chunk(choice.index, echo, None, first=True)
            async for event, index, text in generation.events():
                if event == "delta":
                    yield chunk(index, text, None)
                    continue
                choice = generation.choices[index]
                if choice.finish_reason == "error":
                    yield sse(ApiError(500, f"generation failed: {choice.error}", type="server_error").body())
                    continue
                yield chunk(index, text, self._finish_reason(choice))
            if include_usage:
                completion = sum(c.text.num_tokens for c in generation.choices)
                yield sse(envelope(chunk_kind, request_id, self.model_id, [], created)
                          | {"usage": usage(prompt_tokens, completion)})
            yield sse("[DONE]")
        finally:
            generation.cancel()  # a client that went away frees its slots here


def build_app(args: dict):
    """Serve config / KubeRay RayService entry point (import_path orchestrator.serve.app:build_app);
    `args` are a deploy spec's fields."""
    return build_application(parse_spec({"kind": "deploy", **dict(args)}, source="serve config args"))


def build_application(spec: DeploySpec):
    """The bound Serve application for a deploy spec: what `deploy` runs and what a Serve
    config / KubeRay RayService imports (orchestrator.serve.app:build_app)."""
    options = serve_options(spec, resolve_api_key(spec))
    accepted = inspect.signature(GPTServer.options).parameters
    # older Ray versions lack some options (max_surge_percent)
    actor_options = {k: v for k, v in deployment_options(spec).items() if k in accepted}
    return GPTServer.options(**actor_options).bind(spec.checkpoint, forwarded_env(), options.to_dict())
