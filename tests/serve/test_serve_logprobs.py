"""`logprobs` + `echo` on /v1/completions (OpenAI's legacy completions shape), and `gptctl eval`
against a deployed endpoint through lm-eval's own local-completions model."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import httpx
import pytest

from model import load_pretrained
from orchestrator.serve.logprobs import completion_logprobs, kept_completion_ids, token_logprobs
from orchestrator.serve.protocol import ApiError, ChatRequest, CompletionRequest, validate_request

TASKS_DIR = str(Path(__file__).resolve().parents[2] / "examples" / "lm_eval_tasks")
TEXT = "Alice lives in Paris. Bob lives in Rome."


@pytest.mark.parametrize("value, ok", [(0, True), (1, True), (5, True), (6, False), (-1, False), (True, False),
                                       ("2", False)])
def test_logprobs_is_an_integer_up_to_5(value, ok):
    body = {"prompt": "x", "logprobs": value, "echo": True}
    if ok:
        assert validate_request(body, CompletionRequest).logprobs == value
    else:
        with pytest.raises(ApiError) as info:
            validate_request(body, CompletionRequest)
        assert info.value.param == "logprobs"
    with pytest.raises(ApiError) as info:  # chat's logprobs (a bool + top_logprobs) is not implemented
        validate_request({"messages": [], "logprobs": True}, ChatRequest)
    assert info.value.param == "logprobs"


def test_logprobs_object_is_the_models_distribution(serve_checkpoints, serve_tokenizer):
    model, tok = load_pretrained(serve_checkpoints[0]), serve_tokenizer
    prompt, completion = tok.encode(TEXT), tok.encode(" Carol")
    out = completion_logprobs(model, tok, prompt, completion, echo_text=TEXT, top_n=2)
    ids = prompt + completion
    assert "".join(out["tokens"]) == TEXT + " Carol"
    assert out["text_offset"] == [len(tok.decode(ids[:t])) for t in range(len(ids))]
    assert out["token_logprobs"][0] is None and out["top_logprobs"][0] is None
    rows = token_logprobs(model, ids)
    for t in range(1, len(ids)):
        assert out["token_logprobs"][t] == pytest.approx(rows[t, ids[t]].item(), abs=1e-6)
        top = out["top_logprobs"][t]
        assert 2 <= len(top) <= 3 and top[tok.decode([ids[t]])] == pytest.approx(out["token_logprobs"][t])
        assert max(top.values()) == pytest.approx(rows[t].max().item(), abs=1e-6)
    only_completion = completion_logprobs(model, tok, prompt, completion, echo_text=None, top_n=0)
    assert only_completion["tokens"] == out["tokens"][len(prompt):]
    assert only_completion["text_offset"][0] == 0
    assert all(len(top) == 1 for top in only_completion["top_logprobs"])
    # a stop string cut the text: tokens that start after the cut are not reported; the stop token is
    generated = tok.encode(" Carol lives in Oslo.")
    kept = kept_completion_ids(tok, generated, " Carol", True, None)
    assert tok.decode(kept).startswith(" Carol") and len(kept) < len(generated)
    assert kept_completion_ids(tok, generated, tok.decode(generated), False, tok.eos_id)[-1] == tok.eos_id


@pytest.mark.integration
def test_echo_and_logprobs_over_http(serve_url, serve_checkpoints, serve_tokenizer):
    tok = serve_tokenizer
    model = load_pretrained(serve_checkpoints[0])
    ids = tok.encode(TEXT)
    body = {"prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    reply = httpx.post(f"{serve_url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == len(ids) + 1  # the prompt, then the one generated token
    assert choice["text"].startswith(TEXT) and logprobs["text_offset"][len(ids)] == len(TEXT)
    expected = token_logprobs(model, ids + [0])  # the last row: the distribution of the generated token
    assert logprobs["token_logprobs"][0] is None
    for t in range(1, len(ids)):
        assert abs(logprobs["token_logprobs"][t] - expected[t, ids[t]].item()) < 1e-4
    assert abs(logprobs["token_logprobs"][-1] - expected[-1].max().item()) < 1e-4  # greedy: the likeliest

    # max_tokens 0 with echo: the prompt scored, nothing generated
    prompt_only = httpx.post(f"{serve_url}/v1/completions", timeout=60, json={
        "prompt": "Alice lives", "echo": True, "logprobs": 0, "max_tokens": 0}).json()["choices"][0]
    assert prompt_only["text"] == "Alice lives" and prompt_only["finish_reason"] == "length"
    assert "".join(prompt_only["logprobs"]["tokens"]) == "Alice lives"
    # without echo: only the completion's tokens, offsets from the completion's start
    plain = httpx.post(f"{serve_url}/v1/completions", timeout=60, json={
        "prompt": TEXT, "logprobs": 2, "max_tokens": 4, "temperature": 0}).json()["choices"][0]
    assert 1 <= len(plain["logprobs"]["tokens"]) <= 5 and plain["logprobs"]["text_offset"][0] == 0
    refused = httpx.post(f"{serve_url}/v1/completions", timeout=60, json={
        "prompt": TEXT, "logprobs": 1, "stream": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"


@pytest.mark.integration
def test_gptctl_eval_against_the_endpoint_matches_in_process(serve_url, serve_checkpoints, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from orchestrator import cli
    from orchestrator.cli.eval import _endpoint_args
    from orchestrator.eval.lm_eval_model import GPTCtlLM

    checkpoint = str(serve_checkpoints[0])
    args = argparse.Namespace(target=f"{serve_url}/v1", tokenizer=checkpoint, api_key_env="GPTCTL_LMEVAL_NO_KEY")
    remote = get_model("local-completions")(**_endpoint_args(args), batch_size=4)
    local = GPTCtlLM(checkpoint=checkpoint, batch_size=4)
    pairs = [("Question: Where does Alice live?\nAnswer:", " Paris"), ("Alice lives in", " Rome."),
             ("The quick", " brown fox"), ("x", " Oslo")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    for (ours, ours_greedy), (theirs, theirs_greedy) in zip(local.loglikelihood(requests),
                                                             remote.loglikelihood(requests)):
        assert abs(ours - theirs) < 1e-4 and ours_greedy == theirs_greedy

    # all three kinds of request over HTTP (loglikelihood, rolling, generate_until) score as in process
    scores = {}
    for name, target in (("endpoint", f"{serve_url}/v1"), ("in-process", checkpoint)):
        out = tmp_path / f"{name}.json"
        code = cli.main(["eval", target, "--tokenizer", checkpoint, "--tasks", "gptctl_tiny", "--include-path",
                         TASKS_DIR, "--limit", "2", "--batch-size", "6", "--output", str(out),
                         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
        assert code == 0, capsys.readouterr().err
        scores[name] = json.loads(out.read_text())["results"]
    endpoint, in_process = scores["endpoint"], scores["in-process"]
    assert endpoint["gptctl_tiny_mc"]["acc,none"] == in_process["gptctl_tiny_mc"]["acc,none"]
    assert "exact_match,none" in endpoint["gptctl_tiny_gen"]
    assert endpoint["gptctl_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(
        in_process["gptctl_tiny_ppl"]["bits_per_byte,none"], rel=1e-5)
    assert cli.main(["eval", serve_url, "--tasks", "gptctl_tiny_mc", "--include-path", TASKS_DIR]) == 2
    assert "--tokenizer" in capsys.readouterr().err
