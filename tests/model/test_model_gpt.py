import math

import pytest
import torch
from model_testutil import VOCAB, make_model

from model import GPT, config_from_preset


def reference_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2 forward written out by hand from the weights: explicit masked softmax attention."""
    cfg = model.config
    tr = model.transformer
    T = idx.shape[1]
    hd = cfg.n_embd // cfg.n_head

    def ln(x, mod):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + mod.eps) * mod.weight
        return y + mod.bias if mod.bias is not None else y

    def linear(x, mod):
        y = x @ mod.weight.T
        return y + mod.bias if mod.bias is not None else y

    def gelu(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    x = tr.wte.weight[idx] + tr.wpe.weight[:T]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for block in tr.h:
        h = ln(x, block.ln_1)
        q, k, v = linear(h, block.attn.c_attn).split(cfg.n_embd, dim=-1)
        heads = []
        for i in range(cfg.n_head):
            s = slice(i * hd, (i + 1) * hd)
            scores = q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(hd)
            scores = scores.masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[..., s])
        x = x + linear(torch.cat(heads, dim=-1), block.attn.c_proj)
        x = x + linear(gelu(linear(ln(x, block.ln_2), block.mlp.c_fc)), block.mlp.c_proj)
    return ln(x, tr.ln_f) @ tr.wte.weight.T


@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_hand_written_reference(bias):
    model = make_model(bias=bias)
    idx = torch.randint(0, VOCAB, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, VOCAB) and loss is None
    torch.testing.assert_close(logits, reference_forward(model, idx), rtol=1e-9, atol=1e-9)


def test_causality(model):
    torch.manual_seed(1)
    T = 20
    idx = torch.randint(0, VOCAB, (2, T))
    logits, _ = model(idx)
    for t in range(T - 1):
        changed = idx.clone()
        changed[:, t + 1 :] = (
            changed[:, t + 1 :] + 1 + torch.randint(0, VOCAB - 1, (2, T - t - 1))
        ) % VOCAB
        new_logits, _ = model(changed)
        torch.testing.assert_close(new_logits[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-12)
        # ...and the change is visible after t, so the test is not vacuous.
        assert not torch.allclose(new_logits[:, t + 1 :], logits[:, t + 1 :])


def hand_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per position, via an explicit log-sum-exp."""
    out = torch.zeros(targets.shape, dtype=torch.float64)
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            row = logits[b, t].double()
            lse = row.max() + torch.log(torch.exp(row - row.max()).sum())
            out[b, t] = lse - row[targets[b, t]]
    return out


def test_loss_is_mean_next_token_cross_entropy(model):
    torch.manual_seed(2)
    seq = torch.randint(0, VOCAB, (3, 13))
    idx, targets = seq[:, :-1], seq[:, 1:]  # teacher forcing: position t predicts token t+1
    logits, loss = model(idx, targets)
    ce = hand_cross_entropy(logits.detach(), targets)
    torch.testing.assert_close(loss.double(), ce.mean(), rtol=1e-6, atol=1e-6)

    ignored = targets.clone()
    ignored[0, :5] = -100
    ignored[2, -1] = -100
    keep = ignored != -100
    _, loss_ignored = model(idx, ignored)
    torch.testing.assert_close(loss_ignored.double(), ce[keep].mean(), rtol=1e-6, atol=1e-6)


def test_loss_mask_gives_masked_mean(model):
    torch.manual_seed(3)
    seq = torch.randint(0, VOCAB, (2, 11))
    idx, targets = seq[:, :-1], seq[:, 1:]
    mask = torch.zeros(targets.shape)
    mask[0, 4:] = 1.0  # "response" tokens only
    mask[1, 7:] = 1.0
    logits, loss = model(idx, targets, loss_mask=mask)
    ce = hand_cross_entropy(logits.detach(), targets)
    expected = (ce * mask.double()).sum() / mask.sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    assert not torch.isclose(loss.double(), ce.mean())

    _, empty = model(idx, targets, loss_mask=torch.zeros(targets.shape))
    assert empty.item() == 0.0  # nothing to learn from, not NaN


def test_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny", vocab_size=VOCAB))
    idx = torch.randint(0, VOCAB, (4, 32))
    _, loss = model(idx, torch.randint(0, VOCAB, (4, 32)))
    assert abs(loss.item() - math.log(VOCAB)) < 0.1


def test_backward_reaches_every_parameter(model):
    model.train()
    idx = torch.randint(0, VOCAB, (2, 8))
    _, loss = model(idx, torch.randint(0, VOCAB, (2, 8)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_weight_tying_is_one_parameter(model):
    assert model.lm_head.weight is model.transformer.wte.weight
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)
    assert sum(p is model.transformer.wte.weight for p in params) == 1


def test_gpt2_parameter_count():
    cfg = config_from_preset("gpt2", vocab_size=50257)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_parameters() == 124_439_808
    assert model.num_parameters(exclude_embeddings=True) == 124_439_808 - 50257 * 768 - 1024 * 768


def test_gpt2_init_statistics():
    torch.manual_seed(0)
    cfg = config_from_preset("tiny", n_layer=8, vocab_size=VOCAB)
    model = GPT(cfg)
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.002
    c_fc = model.transformer.h[0].mlp.c_fc
    assert abs(c_fc.weight.std().item() - 0.02) < 0.002
    assert torch.all(c_fc.bias == 0)
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h])
    assert abs(proj.std().item() - 0.02 / math.sqrt(2 * 8)) < 0.0005


def test_param_groups_cover_each_parameter_once(model):
    groups = model.configure_param_groups(weight_decay=0.1)
    decay, no_decay = groups[0]["params"], groups[1]["params"]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    ids = [id(p) for p in decay + no_decay]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert all(p.dim() >= 2 for p in decay) and all(p.dim() < 2 for p in no_decay)
    assert any(p is model.transformer.wte.weight for p in decay)
    assert any(p is model.transformer.ln_f.weight for p in no_decay)
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as-is


def test_too_long_input_rejected(model):
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, model.config.block_size + 1, dtype=torch.long))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny", vocab_size=VOCAB, dropout=0.2))
    idx = torch.randint(0, VOCAB, (1, 10))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


@pytest.mark.parametrize("kernel", ["flash", "math"])
def test_a_pinned_attention_kernel_gives_the_same_loss_and_gradients(kernel):
    """train.attention_kernel only picks how SDPA computes attention, not what it computes."""
    from model.attention import attention_kernel

    model = make_model().float().train()
    seq = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(4))
    idx, targets = seq[:, :-1], seq[:, 1:]

    def loss_and_grads():
        model.zero_grad()
        _, loss = model(idx, targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    reference_loss, reference_grads = loss_and_grads()
    with attention_kernel(kernel):
        loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5)
    for grad, reference in zip(grads, reference_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-4)


def test_a_pinned_attention_kernel_is_the_one_that_runs():
    from torch.profiler import profile

    from model.attention import attention_kernel

    model = make_model().float()
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))

    def ops_run(kernel: str) -> set[str]:
        with attention_kernel(kernel), profile() as profiler:
            model(idx)
        return {event.key for event in profiler.key_averages()}

    assert any("flash_attention" in op for op in ops_run("flash"))
    assert not any("flash_attention" in op for op in ops_run("math"))
