"""Request validation, chat rendering, streamed text assembly and deploy options (no Ray)."""
from __future__ import annotations

import pytest

from orchestrator.data.prepare import format_prompt
from orchestrator.jobs.controller import JobInputError
from orchestrator.serve.deployment import deployment_options, resolve_api_key, serve_options
from orchestrator.serve.options import ServeOptions, bearer_matches, hash_api_key
from orchestrator.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    parse_json_body,
    render_chat,
    validate_request,
)
from orchestrator.serve.text import TextAssembler
from orchestrator.spec import SpecError, parse_spec


def _error(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize("raw, message", [
    (b'{"prompt": "\xff"}', "UTF-8"),
    (b"", "empty"),
    (b"{nope", "not valid JSON"),
    (b'{"prompt": NaN}', "NaN"),
    (b"[1, 2]", "JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b'{"prompt": "\\ud800"}', "surrogate"),
])
def test_bad_bodies_are_400_with_a_message(raw, message):
    assert message in _error(parse_json_body, raw).message


def test_unsupported_parameters_are_named_and_no_op_values_accepted():
    error = _error(validate_request, {"prompt": "x", "suffix": "y", "frobnicate": 1}, CompletionRequest)
    assert "frobnicate" in error.message and "suffix" in error.message and error.param == "frobnicate"
    ok = {"prompt": "x", "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0.0, "user": "u", "best_of": 1}
    assert validate_request(ok, CompletionRequest).prompt == "x"
    assert "presence_penalty" in _error(validate_request, {"prompt": "x", "presence_penalty": 0.5}, CompletionRequest).message
    assert "tools" in _error(validate_request, {"messages": [], "tools": [{"type": "function"}]}, ChatRequest).message


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "5"), ("max_tokens", 5.0), ("temperature", "hot"), ("temperature", -1), ("temperature", 2.5),
    ("top_p", 0), ("top_k", 0), ("n", 0), ("n", True), ("seed", -1), ("stop", ["a"] * 5), ("stop", [""]),
    ("stream", "yes"), ("prompt", 5), ("prompt", [1, "a"]), ("truncate_prompt_tokens", 0),
])
def test_wrong_types_and_values_name_the_field(field, value):
    body = {"prompt": "x", field: value}
    error = _error(validate_request, body, CompletionRequest)
    assert error.param == field and field in error.message


def test_chat_renders_the_last_user_message_with_the_finetune_template():
    req = validate_request({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": [{"type": "text", "text": "Where does "}, {"type": "text", "text": "Alice live?"}]},
    ]}, ChatRequest)
    assert render_chat(req.messages, format_prompt) == format_prompt("Where does Alice live?")
    last_assistant = validate_request({"messages": [{"role": "user", "content": "q"},
                                                    {"role": "assistant", "content": "a"}]}, ChatRequest)
    assert "last message" in _error(render_chat, last_assistant.messages, format_prompt).message
    assert "at least one" in _error(render_chat, [], format_prompt).message
    for bad in ({"role": "tool", "content": "x"}, {"role": "user", "content": [{"type": "image_url"}]},
                {"role": "user", "content": "x", "tool_calls": []}):
        assert _error(validate_request, {"messages": [bad]}, ChatRequest).param == "messages"


def test_text_assembler_streams_utf8_safely_and_honours_stop_strings(serve_tokenizer):
    text = "Alice lives in Paris. 中文 🙂 Bob lives in Rome."
    ids = serve_tokenizer.encode(text)

    def stream(stop):
        assembler = TextAssembler(serve_tokenizer, stop)
        parts = []
        for token in ids:
            parts.append(assembler.push(token))
            assert "\ufffd" not in parts[-1]
            if assembler.stopped:
                break
        parts.append(assembler.flush())
        return "".join(parts), assembler

    assert stream([])[0] == text
    for stop in (["Paris"], ["🙂"], ["s in R"], ["zzz", "Bob"], ["."]):
        expected = text[: min(text.find(s) for s in stop if s in text)]
        out, assembler = stream(stop)
        assert out == expected and assembler.stopped and assembler.text == expected
    assert stream(["nowhere"])[0] == text
    lazy = TextAssembler(serve_tokenizer, [], incremental=False)  # non-streamed: one decode at the end
    assert [lazy.push(t) for t in ids] == [""] * len(ids) and lazy.flush() == text and lazy.num_tokens == len(ids)


def test_api_key_is_hashed_and_compared_in_constant_time():
    digest = hash_api_key("s3cret")
    assert digest != "s3cret" and len(digest) == 64
    assert bearer_matches("Bearer s3cret", digest) and bearer_matches("bearer  s3cret ", digest)
    for header in (None, "", "s3cret", "Bearer", "Bearer wrong", "Basic s3cret"):
        assert not bearer_matches(header, digest)


def _spec(**fields):
    return parse_spec({"kind": "deploy", "checkpoint": "/x", **fields})


def test_deploy_spec_options(tmp_path, monkeypatch):
    plain = deployment_options(_spec(num_replicas=2, cpus_per_replica=2))
    assert plain["num_replicas"] == 2 and plain["ray_actor_options"] == {"num_cpus": 2}
    assert plain["max_surge_percent"] == 100, "a redeploy starts new replicas before stopping old ones"
    auto = deployment_options(_spec(min_replicas=1, max_replicas=4, target_ongoing_requests=8, gpus_per_replica=1))
    assert "num_replicas" not in auto and auto["ray_actor_options"]["num_gpus"] == 1
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                          "target_ongoing_requests": 8}
    from orchestrator.serve.app import GPTServer

    config = GPTServer.options(**auto)._deployment_config  # Serve itself accepts the options
    assert config.autoscaling_config.max_replicas == 4 and config.max_ongoing_requests == 256
    for bad in (dict(min_replicas=3, max_replicas=2), dict(min_replicas=1)):
        with pytest.raises(SpecError):
            deployment_options(_spec(**bad))
    with pytest.raises(SpecError, match="api_key_env"):
        _spec(api_key_env="sk-this-looks-like-a-key")  # a name, never the key itself

    monkeypatch.setenv("MY_KEY", "k1")
    key_file = tmp_path / "key"
    key_file.write_text("k2\n")
    assert resolve_api_key(_spec()) is None
    assert resolve_api_key(_spec(api_key_env="MY_KEY")) == "k1"
    assert resolve_api_key(_spec(api_key_file=str(key_file))) == "k2"
    with pytest.raises(JobInputError, match="MISSING_KEY"):
        resolve_api_key(_spec(api_key_env="MISSING_KEY"))
    with pytest.raises(JobInputError):
        resolve_api_key(_spec(api_key_file=str(tmp_path / "absent")))
    with pytest.raises(SpecError):
        resolve_api_key(_spec(api_key_env="MY_KEY", api_key_file=str(key_file)))

    options = serve_options(_spec(name="m", max_context=100, gpus_per_replica=1), api_key="k1")
    assert options.api_key_sha256 == hash_api_key("k1") and "k1" not in str(options.to_dict())
    assert options.device == "cuda" and options.model_id == "m" and options.max_context == 100
    assert ServeOptions.from_dict(options.to_dict()) == options
    with pytest.raises(SpecError):
        serve_options(_spec(max_context=10, max_tokens_limit=20))
