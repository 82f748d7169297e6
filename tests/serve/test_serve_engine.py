"""The continuous-batching engine alone (no Ray): batch invariance, stop rules, cancellation."""
from __future__ import annotations

import threading

import pytest
import torch

from model import GPT, GPTConfig, SamplingParams, generate
from model.batching import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    BatchEngine,
    CollectingSink,
    decode_step,
)

VOCAB = 97


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(block_size: int = 64, std: float = 0.3, seed: int = 0, n_embd: int = 48) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=3, n_embd=n_embd))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def prompts_and_params(count: int) -> list[tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(123)
    out = []
    for i in range(count):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        kind = i % 4
        params = [
            SamplingParams(max_new_tokens=12 + i % 7, temperature=0.0),
            SamplingParams(max_new_tokens=20, temperature=1.0, seed=i),
            SamplingParams(max_new_tokens=16, temperature=0.8, top_k=8, seed=100 + i),
            SamplingParams(max_new_tokens=18, temperature=1.3, top_p=0.9, seed=7, stop_token_ids=(3,)),
        ][kind]
        out.append((prompt, params))
    return out


def run_alone(model, prompt, params, **engine_kwargs) -> tuple[list[int], str]:
    engine = BatchEngine(model, **engine_kwargs)
    sink = CollectingSink()
    engine.submit(prompt, params, sink)
    engine.run_until_idle()
    return sink.tokens, sink.reason


def test_decode_step_logits_are_bit_identical_alone_or_in_any_batch():
    """The property behind batch invariance, on fp32 where batched GEMMs do differ in the last bits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=96, n_layer=2, n_head=4, n_embd=64)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(1, 60, (20,), generator=g)]

    def logits_of_first(batch: list[list[int]]) -> torch.Tensor:
        with torch.inference_mode():
            caches = []
            for p in batch:
                cache = model.new_kv_cache(1)
                model(torch.tensor([p]), kv_cache=cache)
                caches.append(cache)
            return decode_step(model, [p[-1] for p in batch], caches, batch_invariant=True)[0]

    alone = logits_of_first(prompts[:1])
    for size in (2, 3, 8, 9, 17, 20):
        assert torch.equal(alone, logits_of_first(prompts[:size])), f"batch of {size}"


def test_same_request_same_tokens_alone_or_batched():
    model = make_model()
    jobs = prompts_and_params(10)
    alone = [run_alone(model, p, sp) for p, sp in jobs]
    engine = BatchEngine(model, max_batch_size=6)
    sinks = []
    for i, (prompt, params) in enumerate(jobs):  # staggered: requests join a running batch
        sink = CollectingSink()
        engine.submit(prompt, params, sink)
        sinks.append(sink)
        if i % 3 == 0:
            engine.step()
    engine.run_until_idle()
    assert [(s.tokens, s.reason) for s in sinks] == alone
    assert engine.stats()["max_batch_seen"] == 6


def test_without_invariance_a_batch_of_one_reproduces_generate():
    model = make_model()
    for prompt, params in prompts_and_params(4):
        tokens, _ = run_alone(model, prompt, params, batch_invariant=False)
        assert tokens == generate(model, prompt, params)


def test_stop_token_length_and_full_context_follow_generate():
    model = make_model(block_size=16)
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    prompt = [5, 6, 7]
    expected = generate(model, prompt, params)
    tokens, reason = run_alone(model, prompt, params)
    assert tokens == expected and len(tokens) == 16 - 3 + 1 and reason == FINISH_LENGTH  # context full
    stop = expected[4]
    tokens, reason = run_alone(model, prompt, SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=(stop,)))
    assert tokens == expected[: expected.index(stop)] and reason == FINISH_STOP
    tokens, reason = run_alone(model, prompt, SamplingParams(max_new_tokens=2, temperature=0.0))
    assert tokens == expected[:2] and reason == FINISH_LENGTH
    tokens, reason = run_alone(model, list(range(16)), params)  # prompt fills the context: one token
    assert len(tokens) == 1 and reason == FINISH_LENGTH


def test_sink_can_stop_and_a_failing_sink_only_ends_its_own_sequence():
    model = make_model()

    class StopAfter(CollectingSink):
        def on_token(self, token_id):
            super().on_token(token_id)
            return len(self.tokens) < 3

    class Broken(CollectingSink):
        def on_token(self, token_id):
            raise RuntimeError("sink bug")

    engine = BatchEngine(model)
    stopper, broken, normal = StopAfter(), Broken(), CollectingSink()
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    for sink in (stopper, broken, normal):
        engine.submit([1, 2, 3], params, sink)
    engine.run_until_idle()
    assert len(stopper.tokens) == 3 and stopper.reason == FINISH_STOP
    assert broken.reason == FINISH_ERROR and isinstance(broken.error, RuntimeError)
    assert len(normal.tokens) == 10 and normal.reason == FINISH_LENGTH
    assert engine.stats()["errors"] == 1


def test_cancel_frees_the_slot_and_queue_respects_max_batch_size():
    model = make_model()
    engine = BatchEngine(model, max_batch_size=2)
    sinks = [CollectingSink() for _ in range(4)]
    ids = [engine.submit([1, 2], SamplingParams(max_new_tokens=30, temperature=0.0), s) for s in sinks]
    engine.step()
    assert engine.stats()["active"] == 2 and engine.stats()["waiting"] == 2
    engine.cancel(ids[0])  # running
    engine.cancel(ids[3])  # still queued
    engine.step()
    stats = engine.stats()
    assert sinks[0].reason == FINISH_CANCELLED and sinks[3].reason == FINISH_CANCELLED
    assert stats["active"] == 2 and stats["waiting"] == 0 and stats["cancelled"] == 2
    engine.run_until_idle()
    assert [len(s.tokens) for s in sinks[1:3]] == [30, 30]
    assert engine.stats()["max_batch_seen"] == 2


def test_submit_rejects_bad_input():
    engine = BatchEngine(make_model(block_size=16))
    params = SamplingParams(max_new_tokens=4)
    for prompt, match in (([], "at least one"), (list(range(17)), "block_size"), ([5, VOCAB], "vocabulary")):
        with pytest.raises(ValueError, match=match):
            engine.submit(prompt, params, CollectingSink())
    assert engine.stats()["submitted"] == 0


def test_background_thread_serves_concurrent_submitters():
    model = make_model()
    jobs = prompts_and_params(8)
    expected = [run_alone(model, p, sp) for p, sp in jobs]
    engine = BatchEngine(model, max_batch_size=4).start()
    sinks = [CollectingSink() for _ in jobs]
    try:
        threads = [threading.Thread(target=engine.submit, args=(p, sp, s)) for (p, sp), s in zip(jobs, sinks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(s.done.wait(30) for s in sinks)
        assert [(s.tokens, s.reason) for s in sinks] == expected
        assert engine.alive
    finally:
        engine.stop()
    assert not engine.alive
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit([1], SamplingParams(), CollectingSink())
