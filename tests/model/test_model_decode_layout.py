import torch
from model_testutil import VOCAB, make_model
from torch import nn

from model import SamplingParams, generate, load_pretrained, save_pretrained, use_decode_layout
from model.checkpoint import state_dict_for_saving
from model.decode_layout import is_column_major


def _linear_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def test_same_outputs_and_tokens_with_every_linear_column_major():
    model = make_model()
    idx = torch.randint(0, VOCAB, (2, 16))
    prompt = idx[0, :5].tolist()
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0)
    with torch.no_grad():
        before = model(idx)[0]
    tokens_before = generate(model, prompt, greedy)
    params_before = [id(p) for p in model.parameters()]

    assert use_decode_layout(model) is model
    assert all(is_column_major(w) for w in _linear_weights(model))
    assert model.lm_head.weight is model.transformer.wte.weight  # still one tied Parameter
    assert [id(p) for p in model.parameters()] == params_before  # same Parameter objects
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], before, rtol=1e-9, atol=1e-9)
    assert generate(model, prompt, greedy) == tokens_before


def test_keeps_no_second_copy_and_is_idempotent():
    model = use_decode_layout(make_model())
    for weight in _linear_weights(model):
        assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
    pointers = [w.data_ptr() for w in _linear_weights(model)]
    use_decode_layout(model)
    assert [w.data_ptr() for w in _linear_weights(model)] == pointers


def test_saving_writes_the_same_row_major_tensors(tmp_path, tokenizer):
    model = make_model().float()
    expected = state_dict_for_saving(model)
    use_decode_layout(model)
    saved = state_dict_for_saving(model)
    assert saved.keys() == expected.keys()
    for key, tensor in saved.items():
        assert tensor.is_contiguous() and torch.equal(tensor, expected[key]), key
    save_pretrained(tmp_path, model, model.config, tokenizer)
    reloaded = load_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
