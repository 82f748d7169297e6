"""The OpenAI-compatible request/response shapes, their validation, and chat rendering.

Validation is strict: a wrong type is an error (no "5" for 5), unknown parameters are refused
by name, and parameters OpenAI knows but this server does not implement are accepted only at
their no-op value (e.g. `presence_penalty: 0`; chat's `logprobs: null`), otherwise refused by name.
/v1/completions implements `logprobs` (an integer, top-N) and `echo` as OpenAI's legacy
completions API specifies them (orchestrator/serve/logprobs.py).
Every refusal is a 400 with OpenAI's error body: {"error": {"message", "type", "param", "code"}}.
"""
# no `from __future__ import annotations`: pydantic resolves these annotations at class creation
import json
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.serve.options import MAX_SEED, MAX_STOP_CHARS, MAX_STOP_SEQUENCES

MAX_LOGPROBS = 5  # OpenAI's limit for the legacy completions `logprobs`


class ApiError(Exception):
    """An error answered as OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# parameters OpenAI defines that are accepted only at a value that changes nothing
_NO_OP_VALUES: dict[str, tuple] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "modalities": (None, ["text"]),
    "user": None,  # any string: only an end-user label, ignored
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, description="new tokens; bounded by the server's limit")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, description="gptctl extension; null or -1: no top-k")
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    truncate_prompt_tokens: int | None = Field(
        default=None, description="gptctl/vLLM extension: keep only the last k prompt tokens; -1: as many as fit"
    )
    best_of: int | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is None or value == -1:
            return None
        if value < 1:
            raise ValueError("must be >= 1, or -1/null for no top-k")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else list(value)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        for s in stops:
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each stop sequence must be 1..{MAX_STOP_CHARS} characters")
        return stops

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 1:
            raise ValueError("must be >= 1, or -1 for as many tokens as fit")
        return value


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS,
        description="log-probabilities of each returned token and of the N likeliest alternatives at its "
                    "position (OpenAI legacy completions); with echo, of the prompt's tokens too",
    )
    use_template: bool = Field(default=False, description="gptctl extension: wrap each prompt in the fine-tuning template")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


def parse_json_body(raw: bytes) -> dict:
    """Bytes → dict, or ApiError(400) that says what is wrong with them."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"request body is not valid UTF-8 (invalid byte at offset {error.start})") from None
    if not text.strip():
        raise ApiError(400, "request body is empty; expected a JSON object")

    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    _check_unicode(data, "")
    return data


def _check_unicode(value: Any, path: str) -> None:
    """JSON may carry unpaired surrogates (\\ud800) that no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{path or 'body'}: contains an unpaired UTF-16 surrogate (invalid Unicode)",
                           param=path.split(".")[0] or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, path)
            _check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{path}.{i}")


def validate_request(data: dict, model: type[_SamplingFields]) -> _SamplingFields:
    known = set(model.model_fields)
    unsupported = []
    for key in sorted(set(data) - known):
        if key not in _NO_OP_VALUES:
            unsupported.append(key)
        elif _NO_OP_VALUES[key] is not None and not any(_same(data[key], ok) for ok in _NO_OP_VALUES[key]):
            unsupported.append(key)
    if "best_of" in data and data["best_of"] not in (None, 1, data.get("n", 1)):
        unsupported.append("best_of")
    if unsupported:
        raise ApiError(400, f"unsupported parameter(s): {', '.join(unsupported)}", param=unsupported[0],
                       code="unsupported_parameter")
    try:
        return model.model_validate({k: v for k, v in data.items() if k in known})
    except ValidationError as error:
        problems = []
        for item in error.errors()[:5]:
            where = ".".join(str(part) for part in item["loc"]) or "body"
            problems.append(f"{where}: {item['msg']}")
        first = error.errors()[0]["loc"]
        raise ApiError(400, "invalid request: " + "; ".join(problems),
                       param=str(first[0]) if first else None) from None


def _same(value: Any, ok: Any) -> bool:
    # 0 == False in Python; keep bools and numbers apart except where listed together
    return type(value) is type(ok) and value == ok or (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and isinstance(ok, (int, float)) and not isinstance(ok, bool) and value == ok
    )


def message_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


def render_chat(messages: list[ChatMessage], format_prompt) -> str:
    """The prompt a chat request becomes: the fine-tuning template around the last user message.

    The model was fine-tuned on single-turn `format_prompt(prompt) + response` rows, with no
    notion of system prompts or earlier turns, so those are not shown to it: a request's last
    message must come from the user, and only that message is rendered.
    """
    if not messages:
        raise ApiError(400, "messages: must contain at least one message", param="messages")
    last = messages[-1]
    if last.role != "user":
        raise ApiError(400, f"messages: the last message must have role 'user', got '{last.role}'",
                       param="messages")
    return format_prompt(message_text(last))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, request_id: str, model: str, choices: list, created: int | None = None) -> dict:
    return {"id": request_id, "object": kind, "created": created or int(time.time()), "model": model,
            "system_fingerprint": None, "choices": choices}


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode("utf-8")
