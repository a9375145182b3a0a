"""transforms/cpu_speedups.py changes the speed of the method, not what it computes: the oneDNN linear layers and
their prepacked weights against nn.Linear, the nucleus bound against the sampler's full sort, the sparse embedding
gradient against the dense one, and the sampler with every speed-up against the sampler without. And it switches
them on in the open: new layers holding the same Parameters, an attribute of the model, one switch to turn all off."""
import pytest
import torch

import sampler
from conftest import make_tiny_model
from transforms import cpu_speedups
from transforms.cpu_speedups import ONEDNN_FLOAT32, OneDNNLinear, bounded_top_k_top_p, nucleus_size_bound

needs_onednn = pytest.mark.skipif(not ONEDNN_FLOAT32, reason="this PyTorch build has no oneDNN")


@needs_onednn
def test_float32_linear_runs_on_onednn_forward_and_backward():
    torch.manual_seed(0)
    reference, x = torch.nn.Linear(64, 96), torch.randn(3, 5, 64, requires_grad=True)
    layer = torch.nn.Linear(64, 96)
    layer.load_state_dict(reference.state_dict())
    layer = OneDNNLinear.from_linear(layer)
    x_ref = x.detach().clone().requires_grad_()
    with torch.profiler.profile() as prof:
        y = layer(x)
        y.backward(y.detach())
    assert [e.name for e in prof.events()].count("mkldnn::_linear_pointwise") == 3  # y, dx and dW
    y_ref = reference(x_ref)
    y_ref.backward(y_ref.detach())
    for got, expected in ((y, y_ref), (x.grad, x_ref.grad), (layer.weight.grad, reference.weight.grad),
                          (layer.bias.grad, reference.bias.grad)):
        assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype: plain F.linear
        assert layer(x).dtype == torch.bfloat16


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_weights_give_the_same_logits_and_are_dropped_after(dtype):
    """In inference mode (the sampler) the linear layers multiply by weights packed once in oneDNN's layout: the same
    products (bf16 to the last bit; float32 within rounding, oneDNN may sum a row with its bias in another order),
    for 1, 5 and 33 rows; a changed weight is packed again, and the copy goes at the first call outside."""
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no oneDNN bf16 kernel on this machine")
    model = make_tiny_model("qwen2", attention_bias=True).to(dtype)
    plain = make_tiny_model("qwen2", attention_bias=True).to(dtype)
    cpu_speedups.apply(model)
    assert isinstance(model.lm_head, OneDNNLinear) and type(plain.lm_head) is torch.nn.Linear
    for rows in (1, 5, 33):
        ids = torch.randint(0, 97, (rows, 9), generator=torch.Generator().manual_seed(rows))
        with torch.inference_mode():
            packed = model(ids)
            assert model.lm_head.packed is not None
        with torch.no_grad():
            expected = plain(ids)
            model(ids)  # outside inference mode: the packed copies go
        assert model.lm_head.packed is None
        if dtype == torch.bfloat16:
            assert torch.equal(packed, expected)
        else:
            assert (packed - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
        plain.lm_head.weight.mul_(2)
    with torch.inference_mode():
        assert torch.allclose(model(ids), plain(ids), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0, 10.0])
def test_the_bounded_nucleus_keeps_the_full_sorts_candidates(scale, top_p):
    """Flat to peaked rows over a 49,152-token vocabulary: the histogram bound holds every row's nucleus, and the
    kept tokens and their logits are those of sampler.top_k_top_p, which sorts the whole vocabulary."""
    logits = torch.randn(8, 49152, generator=torch.Generator().manual_seed(0)) * scale
    gap = logits.max(-1, keepdim=True).values - logits
    bound = nucleus_size_bound(gap, torch.exp(-gap), torch.exp(-gap).sum(-1, keepdim=True), top_p)
    plain_values, plain_ids = cpu_speedups.plain_top_k_top_p(logits, 0, top_p)
    values, ids = bounded_top_k_top_p(logits, 0, top_p)
    assert values.shape[1] == bound <= 49152
    if scale >= 3.0:  # peaked rows, as a trained model's: far fewer candidates than the vocabulary
        assert bound < 49152 // 2
    for v, i, pv, pi in zip(values, ids, plain_values, plain_ids):
        kept, plain_kept = torch.isfinite(v), torch.isfinite(pv)
        assert bound >= int(plain_kept.sum())
        assert (dict(zip(i[kept].tolist(), v[kept].tolist()))
                == dict(zip(pi[plain_kept].tolist(), pv[plain_kept].tolist())))


def test_a_nucleus_wider_than_the_bound_falls_back_to_the_full_sort(monkeypatch):
    logits = torch.zeros(1, 50)  # uniform: the nucleus of 0.9 holds 45 tokens
    monkeypatch.setattr(cpu_speedups, "nucleus_size_bound", lambda *args: 8)  # a bound rounding broke
    values, _ = bounded_top_k_top_p(logits, 0, 0.9)
    assert int(torch.isfinite(values).sum()) == 45


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (5, 0.8), (0, 1.0)])
def test_the_sampler_draws_the_same_tokens_with_the_speedups(top_k, top_p):
    prompts = [[5, 9, 3], [7], [11, 2, 8, 4, 6, 1, 30], [3, 3], [60, 61, 62, 63, 64]]
    model = make_tiny_model("qwen2")
    kwargs = dict(max_new_tokens=12, temperature=0.8, top_p=top_p, top_k=top_k, seed=3, batch_size=5, progress=False,
                  return_logprobs=True)
    expected = sampler.generate(model, prompts, **kwargs)
    cpu_speedups.apply(model)
    assert model.top_k_top_p is bounded_top_k_top_p and sampler.top_k_top_p is cpu_speedups.plain_top_k_top_p
    got = sampler.generate(model, prompts, **kwargs)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    for (_, logprobs), (_, expected_logprobs) in zip(got, expected):
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(expected_logprobs), atol=1e-5)


def test_for_dpo_keeps_the_dense_gradient_where_it_must():
    tied = make_tiny_model("qwen2", tie_word_embeddings=True)
    untied, other = make_tiny_model("qwen2"), make_tiny_model("qwen2")
    cpu_speedups.for_dpo(tied, world=1, sharded=False)
    cpu_speedups.for_dpo(untied, world=1, sharded=False)
    cpu_speedups.for_dpo(other, world=2, sharded=False)  # DDP all-reduces dense gradients
    assert (tied.model.embed_tokens.sparse, untied.model.embed_tokens.sparse, other.model.embed_tokens.sparse) == \
        (False, True, False)


@pytest.mark.parametrize("tied", [False, True])
def test_apply_swaps_in_new_layers_holding_the_same_parameters_and_assigns_into_no_module(tied):
    """As gpt-fast's quantize.py swaps layers: every nn.Linear is replaced, on its parent, by a new OneDNNLinear
    holding the very same Parameter objects; no object's class changes, the state dict keeps its keys and tensors,
    and the nucleus bound goes to this model only: the sampler module is as it was."""
    model = make_tiny_model("qwen2", attention_bias=True, tie_word_embeddings=tied)
    modules = dict(model.named_modules())
    types = {name: type(module) for name, module in modules.items()}
    parameters = dict(model.named_parameters(remove_duplicate=False))
    state = model.state_dict()
    sampler_names = dict(vars(sampler))
    assert cpu_speedups.apply(model) is model
    assert {name: type(module) for name, module in modules.items()} == types  # the old objects, unchanged
    linears = [name for name, t in types.items() if t is torch.nn.Linear]
    assert "lm_head" in linears and "model.layers.0.self_attn.q_proj" in linears
    for name, module in model.named_modules():
        if name in linears:
            assert type(module) is OneDNNLinear and module is not modules[name]
            assert module.weight is modules[name].weight and module.bias is modules[name].bias
        else:
            assert module is modules[name]
    assert all(p is parameters[name] for name, p in model.named_parameters(remove_duplicate=False))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    after = model.state_dict()
    assert list(after) == list(state) and all(after[k].data_ptr() == state[k].data_ptr() for k in state)
    assert vars(sampler) == sampler_names and sampler.top_k_top_p is cpu_speedups.plain_top_k_top_p
    assert model.top_k_top_p is bounded_top_k_top_p


def test_the_switch_turns_every_speedup_off(monkeypatch):
    """MIPO_CPU_SPEEDUPS=0, read at the call: apply and for_dpo leave the model and the heap as they are."""
    heap = []
    monkeypatch.setattr(cpu_speedups, "set_glibc_malloc", lambda **settings: heap.append(settings))
    monkeypatch.delenv("MIPO_CPU_SPEEDUPS", raising=False)
    assert "nucleus bound for top-p" in cpu_speedups.in_force("cpu") and cpu_speedups.in_force("cuda") == []
    assert cpu_speedups.SWITCH == "MIPO_CPU_SPEEDUPS=0"
    monkeypatch.setenv(*cpu_speedups.SWITCH.split("="))
    model = make_tiny_model("qwen2")
    modules = list(model.modules())
    assert cpu_speedups.apply(model) is model
    cpu_speedups.for_dpo(model, world=1, sharded=False)
    assert list(model.modules()) == modules and not any(isinstance(m, OneDNNLinear) for m in modules)
    assert "top_k_top_p" not in vars(model) and not model.model.embed_tokens.sparse and heap == []
    assert cpu_speedups.in_force("cpu") == []
