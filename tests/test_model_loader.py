"""Parity of the handwritten decoder with transformers on tiny random configs, the tokenizer and chat
template on a local HF directory, and every bad input the loader must name in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_loader import ModelConfig, load_model, save_model
from formats import model_sources
from formats.files import MipoError

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama_llama3_rope": dict(TINY, model_type="llama", architectures=["LlamaForCausalLM"], num_attention_heads=4,
                              num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama_tied": dict(TINY, model_type="llama", architectures=["LlamaForCausalLM"], num_attention_heads=4,
                       num_key_value_heads=4, tie_word_embeddings=True),
    "qwen2_bias_ratio7": dict(TINY, model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_attention_heads=7,
                              num_key_value_heads=1, hidden_size=112, rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen3_head_dim": dict(TINY, model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
}


def write_hf_model(config: dict, out_dir, seed=0, qk_scale=1.0):
    """A random transformers model saved as an HF directory (the reference we must match). qk_scale multiplies the
    query and key projections: a random init attends almost uniformly, so its logits hardly depend on positions."""
    torch.manual_seed(seed)
    hf_cfg = transformers.AutoConfig.for_model(**config)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    with torch.no_grad():  # random biases and norm weights, so that a missed one shows up
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5 if "norm" in name else 0.1).add_(1.0 if "norm" in name else 0.0)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk_scale)
    model.save_pretrained(out_dir)
    return model.eval()


@pytest.mark.parametrize("name", ["qwen2_bias_ratio7", "llama_llama3_rope"])
def test_causal_rows_run_without_a_mask_and_equal_the_masked_path(name, tmp_path, monkeypatch):
    """A causal forward (the meter's rows, two-row training, an unpadded prefill) calls scaled_dot_product_attention
    with is_causal and no mask, the fused kernels' case, and gives what an explicit causal mask gives, on an
    unpadded batch and on a right-padded one (real tokens never see the pads after them)."""
    import model_loader
    from sampler import prefill

    write_hf_model(CONFIGS[name], tmp_path, qk_scale=4.0)
    model, _ = load_model_dir_without_tokenizer(tmp_path)
    calls = []
    sdpa = model_loader.F.scaled_dot_product_attention
    monkeypatch.setattr(model_loader.F, "scaled_dot_product_attention",
                        lambda *a, **kw: (calls.append((kw["attn_mask"], kw["is_causal"])), sdpa(*a, **kw))[1])
    ids = torch.randint(0, TINY["vocab_size"], (3, 29), generator=torch.Generator().manual_seed(4))
    causal = torch.ones(29, 29, dtype=torch.bool).tril()
    with torch.no_grad():
        unmasked = model(ids)
        assert calls and all(mask is None and is_causal for mask, is_causal in calls)
        calls.clear()
        masked = model(ids, mask=causal)
        assert calls and all(mask is not None and not is_causal for mask, is_causal in calls)
        assert torch.allclose(unmasked, masked, atol=1e-5)
        right_padded = ids.clone()
        right_padded[1, 20:], right_padded[2, 11:] = 0, 5  # pads after each row's end: its real logits stay
        padded = model(right_padded)
        for row, n in ((0, 29), (1, 20), (2, 11)):
            alone = model(right_padded[row:row + 1, :n])[0]
            assert torch.allclose(padded[row, :n], alone, atol=1e-5)
            assert torch.allclose(padded[row, :n], model(right_padded, mask=causal)[row, :n], atol=1e-5)
        calls.clear()
        logits, _ = prefill(model, [ids[0, :9].tolist(), ids[1, :9].tolist()], 4)  # one length, no shared prefix
        assert calls and all(mask is None and is_causal for mask, is_causal in calls)
        assert torch.allclose(logits, model(ids[:2, :9])[:, -1], atol=1e-5)
        calls.clear()
        prefill(model, [ids[0, :9].tolist(), ids[1, :5].tolist()], 4)  # left padding: a mask
        assert calls and all(mask is not None for mask, _ in calls)


def test_a_bf16_checkpoint_loads_in_bf16_without_a_float32_copy(tmp_path):
    """Every tensor an op makes while a bf16 checkpoint loads in bf16 is seen (a dispatch mode): the float32 ones
    (the RoPE table) stay far below the weights' size; casting after allocating would make a float32 model first,
    twice the weights (on a CPU an untouched allocation costs no resident memory, on a GPU it does)."""
    from safetensors.torch import save_file
    from torch.utils._python_dispatch import TorchDispatchMode

    class Made(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    self.bytes[t.dtype] = self.bytes.get(t.dtype, 0) + t.numel() * t.element_size()
            return out

    ref = write_hf_model(CONFIGS["qwen2_bias_ratio7"], tmp_path)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in ref.state_dict().items()},
              tmp_path / "model.safetensors")
    weights = sum(v.numel() * 2 for v in ref.state_dict().values())
    write_tiny_tokenizer(tmp_path)
    with Made() as made:
        model, _ = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert made.bytes.get(torch.bfloat16, 0) >= weights  # the mode sees the model's own allocations
    assert made.bytes.get(torch.float32, 0) < 0.01 * weights, made.bytes
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value.to(torch.bfloat16))


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name, tmp_path):
    ref = write_hf_model(CONFIGS[name], tmp_path)
    ours, _ = load_model_dir_without_tokenizer(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    diff = (got - expected).abs().max().item()
    print(f"{name}: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("name", ["llama_llama3_rope", "qwen2_bias_ratio7", "qwen3_head_dim"])
def test_cached_decoding_equals_full_forward(name, tmp_path):
    write_hf_model(CONFIGS[name], tmp_path)
    model, _ = load_model_dir_without_tokenizer(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(2, 32)
        # prefill 12 tokens, then one at a time
        steps = [model(ids[:, :12], kv_cache=cache, cache_pos=torch.arange(12), mask=causal_mask(12, 12))]
        for t in range(12, 20):
            one = torch.ones(1, 1, 1, t + 1, dtype=torch.bool)
            steps.append(model(ids[:, t : t + 1], positions=torch.full((2, 1), t), kv_cache=cache,
                               cache_pos=torch.tensor([t]), mask=one))
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["qwen2_bias_ratio7", "qwen3_head_dim"])
def test_bf16_close_to_float32(name, tmp_path):
    """bf16 weights and activations, with RMSNorm, RoPE tables and softmax in float32: at each of 800 positions
    (up to 399; bf16 holds every integer only up to 256) the logits are within 2% of that position's float32
    logit range (measured: 0.8% at most; RoPE angles computed in bf16 reach 6%)."""
    write_hf_model(CONFIGS[name], tmp_path, qk_scale=4.0)
    m32, _ = load_model_dir_without_tokenizer(tmp_path)
    m16, _ = load_model_dir_without_tokenizer(tmp_path, dtype=torch.bfloat16)
    assert m16.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, TINY["vocab_size"], (2, 400), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = m32(ids), m16(ids).float()  # (2, 400, V)
    spread = expected.amax(-1) - expected.amin(-1)  # (2, 400)
    assert ((got - expected).abs().amax(-1) / spread).max().item() < 0.02


def causal_mask(T, S):
    return torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None]


def load_model_dir_without_tokenizer(path, dtype=torch.float32):
    write_tiny_tokenizer(path)
    return load_model(path, dtype=dtype)


def write_tiny_tokenizer(path):
    """A word-level tokenizer.json plus a ChatML template: enough for load_model on random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(TINY["vocab_size"] - 3)}
    vocab.update({"<|im_start|>": 208, "<|im_end|>": 209, "<|endoftext|>": 210})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tok.save(str(path / "tokenizer.json"))
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": chatml}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [209, 210]}))


def test_tokenizer_interface(tmp_path):
    write_hf_model(CONFIGS["llama_tied"], tmp_path)
    _, tok = load_model_dir_without_tokenizer(tmp_path)
    assert tok.encode("w5 w7") == [5, 7]
    assert tok.stop_token_ids == [209, 210] and tok.pad_token_id == 210
    ids = tok.apply_chat_template([{"role": "user", "content": "w3"}])
    # "<|im_start|>user\nw3<|im_end|>\n<|im_start|>assistant\n"; the words user/assistant are unknown: w0
    assert ids == [208, 0, 3, 209, 208, 0]


# ------------------------------------------------------------------ bad input: one line, one error type


def test_config_field_errors():
    base = dict(CONFIGS["llama_tied"])
    with pytest.raises(MipoError, match="model_type 'gpt2' is not supported"):
        ModelConfig.from_dict({**base, "model_type": "gpt2"})
    with pytest.raises(MipoError, match="missing field 'hidden_size'"):
        ModelConfig.from_dict({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(MipoError, match="rope type 'yarn' is not supported"):
        ModelConfig.from_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_rope_parameters_form_equals_rope_scaling_form():
    old = ModelConfig.from_dict(CONFIGS["llama_llama3_rope"])
    raw = {k: v for k, v in CONFIGS["llama_llama3_rope"].items() if k not in ("rope_scaling", "rope_theta")}
    new = ModelConfig.from_dict({**raw, "rope_parameters": {**CONFIGS["llama_llama3_rope"]["rope_scaling"],
                                                            "rope_theta": 500000.0}})
    assert (old.rope_theta, old.rope_scaling) == (new.rope_theta, new.rope_scaling)


def test_bad_model_directories(tmp_path):
    with pytest.raises(MipoError, match="no such model directory"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MipoError, match="no config.json"):
        load_model(tmp_path / "empty")
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(MipoError, match="config.json: malformed JSON"):
        load_model(bad)


def test_missing_misshapen_and_truncated_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    write_hf_model(CONFIGS["qwen2_bias_ratio7"], tmp_path)
    write_tiny_tokenizer(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, weights)
    with pytest.raises(MipoError, match="lacks 1 tensor.*model.norm.weight"):
        load_model(tmp_path)
    save_file({**state, "model.norm.weight": torch.ones(5)}, weights)
    with pytest.raises(MipoError, match="'model.norm.weight' has shape \\(5,\\)"):
        load_model(tmp_path)
    save_file(state, weights)
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(MipoError, match="model.safetensors: cannot read safetensors file"):
        load_model(tmp_path)


def test_sharded_checkpoint_loads(tmp_path):
    ref = write_hf_model(CONFIGS["llama_tied"], tmp_path / "sharded")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours, _ = load_model_dir_without_tokenizer(tmp_path / "sharded")
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() < 1e-4


def fake_snapshot_download(model_dir, calls: list):
    """huggingface_hub.snapshot_download as the hub would answer it, without the network: the repository's files
    are already in model_dir."""
    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns, **kwargs})
        return str(model_dir)
    return snapshot_download


def test_hub_name_downloads_through_snapshot_download_and_loads_like_a_directory(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    write_hf_model(CONFIGS["llama_tied"], tmp_path)
    expected, _ = load_model_dir_without_tokenizer(tmp_path)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download(tmp_path, calls))
    model, tokenizer = load_model("meta-llama/Tiny-Instruct", revision="0123abc")
    assert calls == [{"repo_id": "meta-llama/Tiny-Instruct", "revision": "0123abc",
                      "allow_patterns": model_sources.HUB_FILES}]
    assert "model.safetensors.index.json" in model_sources.HUB_FILES and "*.safetensors" in model_sources.HUB_FILES
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids), expected(ids))
    assert tokenizer.stop_token_ids == [209, 210]
    # A local directory of that shape is a directory, not a hub name; a revision needs a hub name.
    monkeypatch.chdir(tmp_path.parent)
    assert model_sources.resolve_model_dir(tmp_path.name) == Path(tmp_path.name) and len(calls) == 1
    with pytest.raises(MipoError, match="--revision 0123abc: pins a Hugging Face hub model .* is a local directory"):
        model_sources.resolve_model_dir(tmp_path.name, revision="0123abc")
    with pytest.raises(MipoError, match="is a bundled model"):
        model_sources.resolve_model_dir("qwen", revision="0123abc")


def test_unreachable_hub_is_one_line_naming_the_local_directory_way(tmp_path, monkeypatch):
    # The real huggingface_hub in a process of its own (it reads its settings at import), told not to connect
    # (HF_HUB_OFFLINE), with an empty cache: what a machine without network access gets, and no network used.
    pytest.importorskip("huggingface_hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, str(ROOT / "model_loader.py"), "Qwen/Qwen2.5-1.5B-Instruct"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: --model Qwen/Qwen2.5-1.5B-Instruct: not a local directory, and the Hugging Face hub "
                           "cannot be reached") and line.endswith("and pass --model DIR")
    # Without huggingface_hub installed: how to get it, or the local directory way.
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as when not installed
    with pytest.raises(MipoError, match=r"not a local directory; to download it from the Hugging Face hub, pip install "
                                        r"huggingface_hub, or download it .* and pass --model DIR$"):
        load_model("Qwen/Qwen2.5-1.5B-Instruct")


def test_generation_defaults_are_the_files_or_transformers(tmp_path):
    """top_k and repetition_penalty as transformers' generate takes them when a call leaves them out: from the
    directory's generation_config.json, transformers' 50 and 1.0 where the file or a key is missing or null."""
    from formats.hf_files import generation_defaults

    assert generation_defaults(tmp_path) == {"top_k": 50, "repetition_penalty": 1.0}  # no file
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "top_k": 20, "do_sample": True,
                                                                 "repetition_penalty": 1.05, "temperature": 0.7}))
    assert generation_defaults(tmp_path) == {"top_k": 20, "repetition_penalty": 1.05}  # temperature / top_p not read
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": None, "repetition_penalty": 1.1}))
    assert generation_defaults(tmp_path) == {"top_k": 50, "repetition_penalty": 1.1}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": "many"}))
    with pytest.raises(MipoError, match="generation_config.json: top_k must be an integer"):
        generation_defaults(tmp_path)
    write_hf_model(CONFIGS["llama_tied"], tmp_path)
    write_tiny_tokenizer(tmp_path)  # a generation_config.json of stop tokens only
    assert load_model(tmp_path)[0].generation_defaults == {"top_k": 50, "repetition_penalty": 1.0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [209, 210], "top_k": 20}))
    assert load_model(tmp_path)[0].generation_defaults == {"top_k": 20, "repetition_penalty": 1.0}
    model, tokenizer = load_model(tmp_path)
    save_model(model, tokenizer, tmp_path / "trained")  # a trained model samples with its base model's defaults
    assert generation_defaults(tmp_path / "trained") == {"top_k": 20, "repetition_penalty": 1.0}
