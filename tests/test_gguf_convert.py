"""gguf_convert: the bundled GGUF models become HF directories that transformers loads to the same logits
as it gets from the GGUF itself; the tokenizer gives the same ids; bad input fails in one line. And the
handwritten decoder and tokenizer of model_loader on those directories equal transformers on the GGUF.

The real packages are fetched into the default cache (MIPO_CACHE or ~/.cache/mipo) on the first run and
converted once (a one-time cost: the result stays in the cache). Each model is loaded once per module.
"""
import hashlib
import importlib.metadata
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from model_loader import load_model
from formats.hf_files import generation_defaults
from sampler import generate
from formats import gguf_convert
from formats.files import MipoError
from formats.gguf_convert import BUNDLED, BundledGGUF, bundled_gguf, bundled_model_dir, convert_gguf

SHAPES = {  # what the project documents for each bundled model
    "qwen": dict(model_type="qwen2", num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False, rms_norm_eps=1e-6),
    "llama": dict(model_type="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5),
}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "<|im_start|>user\nWhat is 12345 * 3.14159?<|im_end|>\n<|im_start|>assistant\n",
    "東京は日本の首都です。Emoji 😀 and café.",
]
# Texts on which our tokenizer (the HF original's pipeline) and transformers' GGUF tokenizer must agree; the
# next test shows the two places where transformers' GGUF tokenizer differs from the HF original.
TEXTS = [
    "Hello, world! How are you doing today?",
    "I'm sure they'll say it's fine, don't you think? We've seen it. YOU'RE right, I'D say.",
    "def foo(x):\n\tif x > 0:\n\t\treturn x ** 2\n    else:\n        return -x  # negate\n",
    "Numbers: 12345, 3.14159, 1,000,000, 2024-06-01, x=42, v0.19.0 and 007.",
    "Runs   of    spaces\n\n\nand\r\nnewlines \n \n  end  ",
    ("日本語のテキスト、中文测试：你好，世界！"
     "한국어 텍스트 Ελληνικά русский العربية"),
    "Emoji 😀👍🏽🇺🇸 ❤️ and accents: café naïve résumé Ångström",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "inline<|endoftext|>special <|im_end|>tokens",
    "    indented with spaces\n\t\ttabs\t\tinside\t",
    "a\u200bzero width and\u00a0non-breaking space",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Write a haiku about 3.14159 in 日本語 😀."},
]


@pytest.fixture(scope="module", params=["llama", "qwen"])
def name(request):
    return request.param


@pytest.fixture(scope="module")
def model_pair(name):
    """(transformers on our directory, transformers on the GGUF file itself), float32."""
    path = bundled_gguf(name)
    ours = AutoModelForCausalLM.from_pretrained(bundled_model_dir(name), dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    yield ours, reference
    del ours, reference


@pytest.fixture(scope="module")
def tokenizer_trio(name):
    """(tokenizers on our tokenizer.json, AutoTokenizer on our directory, transformers' GGUF tokenizer)."""
    path, model_dir = bundled_gguf(name), bundled_model_dir(name)
    return (Tokenizer.from_file(str(model_dir / "tokenizer.json")), AutoTokenizer.from_pretrained(model_dir),
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))


# ---- the bundled models -----------------------------------------------------------------------------


def test_converted_once_and_alias_shares_the_directory(monkeypatch):
    model_dir = bundled_model_dir("llama")

    def must_not_convert(*args):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(gguf_convert, "convert_gguf", must_not_convert)
    assert bundled_model_dir("llama") == model_dir == bundled_model_dir("smollm2")
    assert not [p for p in model_dir.parent.iterdir() if ".converting-" in p.name]  # no leftovers


def test_unknown_name_is_one_line_error():
    with pytest.raises(MipoError, match="unknown bundled model 'gpt5'.*qwen, llama, smollm2"):
        bundled_model_dir("gpt5")


def test_config_matches_the_documented_model(name):
    config = json.loads((bundled_model_dir(name) / "config.json").read_text())
    assert {k: config[k] for k in SHAPES[name]} == SHAPES[name]
    assert config["head_dim"] == config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["torch_dtype"] == "float32"


def test_weights_are_float32_under_hf_names(name):
    with safe_open(bundled_model_dir(name) / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"F32"}
    layers = SHAPES[name]["num_hidden_layers"]
    per_layer = 12 if name == "qwen" else 9  # + q/k/v bias
    assert len(keys) == layers * per_layer + 2 + (name == "qwen")
    assert ("model.layers.0.self_attn.q_proj.weight" in keys
            and f"model.layers.{layers - 1}.mlp.down_proj.weight" in keys)
    assert ("model.layers.0.self_attn.q_proj.bias" in keys) == (name == "qwen")
    assert ("lm_head.weight" in keys) == (not SHAPES[name]["tie_word_embeddings"])


def test_logits_equal_transformers_loading_the_gguf(name, model_pair):
    ours, reference = model_pair
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir(name))
    worst = 0.0
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            worst = max(worst, (ours(ids).logits - reference(ids).logits).abs().max().item())
    print(f"{name}: max |logit difference| over {len(PROMPTS)} prompts = {worst:.3g}")
    assert worst <= 1e-4


def test_generation_stops_at_every_end_of_turn_token(name):
    model_dir = bundled_model_dir(name)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    vocab = Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab()
    assert generation["eos_token_id"][0] == json.loads((model_dir / "config.json").read_text())["eos_token_id"]
    assert set(generation["eos_token_id"]) == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}


def test_our_decoder_equals_transformers_loading_the_gguf(name, model_pair):
    _, reference = model_pair
    model, tokenizer = load_model(name)
    prompts = [tokenizer.encode(p) for p in PROMPTS] + [tokenizer.apply_chat_template(CONVERSATION)]
    worst = 0.0
    with torch.no_grad():
        for ids in prompts:
            ours, expected = model(torch.tensor([ids])), reference(torch.tensor([ids])).logits
            worst = max(worst, (ours - expected).abs().max().item())
            assert torch.equal(ours.argmax(-1), expected.argmax(-1))  # same greedy token at every position
    print(f"{name}: our decoder vs transformers on the GGUF, max |logit difference| = {worst:.3g}")
    assert worst <= 1e-3


# ---- the tokenizer ----------------------------------------------------------------------------------


def test_token_ids_equal_transformers_gguf_tokenizer(tokenizer_trio):
    ours, ours_auto, reference = tokenizer_trio
    for text in TEXTS:
        expected = reference(text, add_special_tokens=True)["input_ids"]
        assert ours.encode(text).ids == expected, text
        assert ours_auto(text)["input_ids"] == expected, text
        assert ours.decode(expected, skip_special_tokens=False) == text


def test_pre_tokenizer_follows_the_hf_original_not_transformers_gguf(name, tokenizer_trio):
    # transformers' GGUF loader gives Qwen2 no NFC normalizer and SmolLM no digit split; the models' own HF
    # tokenizer.json files have both, and llama.cpp splits digits the same way. These texts show it.
    ours, ours_auto, reference = tokenizer_trio
    if name == "qwen":
        decomposed = "caf" + "e\u0301"  # e + combining acute; NFC makes it one character
        assert ours.encode(decomposed).ids == reference("café")["input_ids"] != reference(decomposed)["input_ids"]
        assert ours_auto(decomposed)["input_ids"] == ours.encode(decomposed).ids
    else:
        # Digits first, then GPT-2's regex: "x   " and "1" are split apart before the spaces are grouped.
        assert ours.encode("x   1").tokens == ["x", "ĠĠĠ", "1"]
        assert reference.convert_ids_to_tokens(reference("x   1")["input_ids"]) == ["x", "ĠĠ", "Ġ", "1"]
        assert ours_auto("x   1")["input_ids"] == ours.encode("x   1").ids


def test_special_tokens_are_whole_and_flagged(name, tokenizer_trio):
    ours, _, reference = tokenizer_trio
    added = {t.content: t for t in ours.get_added_tokens_decoder().values()}
    assert added["<|im_start|>"].special and added["<|im_end|>"].special
    if name == "qwen":  # a user-defined token: matched whole, but kept by skip_special_tokens
        assert not added["<tool_call>"].special
        assert ours.decode(ours.encode("<tool_call><|im_end|>").ids, skip_special_tokens=True) == "<tool_call>"
    assert ours.get_vocab_size() == reference.backend_tokenizer.get_vocab_size() == SHAPES[name]["vocab_size"]


def test_chat_template_renders_like_the_gguf_tokenizer(name, tokenizer_trio):
    _, ours_auto, reference = tokenizer_trio
    text = ours_auto.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert text == reference.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a concise assistant.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
    config = json.loads((bundled_model_dir(name) / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["add_bos_token"]) == ("<|im_end|>", False)


def test_model_loader_tokenizer_equals_transformers(name, tokenizer_trio):
    _, ours_auto, _ = tokenizer_trio
    _, tokenizer = load_model(name)
    for text in TEXTS:
        assert tokenizer.encode(text) == ours_auto(text)["input_ids"], text
    for conversation in (CONVERSATION, CONVERSATION[1:]):  # with and without a system message
        for gen in (True, False):
            expected = ours_auto.apply_chat_template(conversation, add_generation_prompt=gen, tokenize=False)
            assert tokenizer.render_chat(conversation, add_generation_prompt=gen) == expected
            assert tokenizer.apply_chat_template(conversation, add_generation_prompt=gen) == \
                ours_auto(expected, add_special_tokens=False)["input_ids"]
    generation = json.loads((bundled_model_dir(name) / "generation_config.json").read_text())
    assert tokenizer.stop_token_ids == sorted(generation["eos_token_id"])
    assert tokenizer.decode(tokenizer.encode("Hello, 世界 😀")) == "Hello, 世界 😀"


# ---- sampling as the paper's generate(do_sample=True, temperature=T, top_p=P) samples -------------------------

UPSTREAM_SAMPLING = {"qwen": {"top_k": 20, "repetition_penalty": 1.1}, "llama": {}}  # gguf_convert.BUNDLED's sources


def test_generation_config_carries_the_upstream_sampling_defaults(name, model_pair):
    """generation_config.json holds the upstream model's top_k and repetition_penalty, which transformers' generate
    takes when a call leaves them out, and model_loader reads them; SmolLM2's file sets neither: transformers' 50, 1."""
    ours, _ = model_pair
    file = json.loads((bundled_model_dir(name) / "generation_config.json").read_text())
    assert {key: file[key] for key in ("top_k", "repetition_penalty") if key in file} == UPSTREAM_SAMPLING[name]
    assert ours.generation_config.top_k == file.get("top_k")  # transformers reads the same file
    expected = {"top_k": 50, "repetition_penalty": 1.0, **UPSTREAM_SAMPLING[name]}
    assert generation_defaults(bundled_model_dir(name)) == expected
    assert load_model(name)[0].generation_defaults == generation_defaults(bundled_model_dir(name))


def test_greedy_with_repetition_penalty_equals_transformers_generate(name, model_pair):
    """The penalty over prompt and completion, token for token as transformers' generate(do_sample=False,
    repetition_penalty=1.3), on chat prompts, one row at a time (transformers would also penalize a batch's pad id)."""
    ours, _ = model_pair
    model, tokenizer = load_model(name)
    questions = ["Name three colours, then name them again.", "Count from one to ten in words.", "Say hello twice."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    got = generate(model, prompts, 24, temperature=0, repetition_penalty=1.3, stop_token_ids=tokenizer.stop_token_ids,
                   progress=False)
    plain = generate(model, prompts, 24, temperature=0, stop_token_ids=tokenizer.stop_token_ids, progress=False)
    assert got != plain  # the penalty changes the greedy tokens
    for prompt, tokens in zip(prompts, got):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = ours.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                repetition_penalty=1.3)
        assert tokens == out[0, len(prompt):].tolist()


# ---- the conversion itself, on tiny GGUF files written here ------------------------------------------

def tiny_vocab():
    """A byte-level vocabulary: the 256 byte symbols, one merge, two control tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet()) + ["Ġt", "<|endoftext|>", "<|im_end|>"]
    types = [gguf.TokenType.NORMAL] * 257 + [gguf.TokenType.CONTROL] * 2
    return tokens, types, ["Ġ t"]


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    # What llama.cpp's convert_hf_to_gguf does to Llama q/k rows (written out here from its convention:
    # within each head, rows 0..D/2-1 and D/2..D-1 are interleaved pairwise).
    return (weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_tiny_gguf(path, hf_model, arch, add_bos=False):
    """Write an HF model as llama.cpp would (names, q/k permutation for llama), all tensors F32."""
    c = hf_model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokens, types, merges = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    gguf_names = {v: k for k, v in gguf_convert.LAYER_TENSORS.items()}
    top_names = {v: k for k, v in gguf_convert.TOP_TENSORS.items()}
    for key, tensor in hf_model.state_dict().items():
        weight = tensor.float().numpy()
        if key in top_names:
            writer.add_tensor(top_names[key], weight)
            continue
        layer, suffix = key.split(".", 3)[2:]
        if arch == "llama" and suffix in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            weight = llama_cpp_permute(weight, c.num_attention_heads if "q_proj" in suffix else c.num_key_value_heads)
        writer.add_tensor(f"blk.{layer}.{gguf_names[suffix]}", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_hf_model(model_type):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                                  tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms are all ones and biases zero at init; make every tensor matter
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_tiny_model_round_trips_through_llama_cpp_layout(tmp_path, model_type):
    original = tiny_hf_model(model_type)
    write_tiny_gguf(tmp_path / "tiny.gguf", original, model_type)
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 259, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, original(ids).logits)  # the same float32 weights


def test_add_bos_token_is_honoured_like_transformers(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model("llama"), "llama", add_bos=True)
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    ours = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert ours.encode("it 12").tokens[0] == "<|endoftext|>"
    assert ours.encode("it 12").ids == reference("it 12")["input_ids"]


# ---- bad input: one line naming the file, nothing left behind -----------------------------------------


def write_other_architecture(path):
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def put_in_fake_package(cache, part, content: bytes):
    """Put a file where fetch_package would have unpacked a bundled package (so no network is needed)."""
    package, version, file = part
    target = cache / "packages" / f"{package}-{version}" / file
    target.parent.mkdir(parents=True)
    target.write_bytes(content)
    return target


def assert_nothing_converted(cache):
    assert [p.name for p in (cache / "models").glob("*")] == []


def test_other_architecture_is_refused(tmp_path, monkeypatch):
    write_other_architecture(tmp_path / "gpt2.gguf")
    content = (tmp_path / "gpt2.gguf").read_bytes()
    part = ("tiny-gguf", "1.0", "tiny_gguf/model.gguf")
    monkeypatch.setitem(BUNDLED, "tiny", BundledGGUF(parts=(part,), size=len(content),
                                                     sha256=hashlib.sha256(content).hexdigest()))
    cache = tmp_path / "cache"
    monkeypatch.setenv("MIPO_CACHE", str(cache))
    target = put_in_fake_package(cache, part, content)
    with pytest.raises(MipoError) as error:
        bundled_model_dir("tiny")
    message = str(error.value)
    assert "\n" not in message and str(target) in message and "'gpt2'" in message
    assert_nothing_converted(cache)


@pytest.mark.parametrize("damage", ["truncated", "one byte flipped"])
def test_corrupt_download_is_refused(tmp_path, monkeypatch, damage):
    good = bundled_gguf("llama").read_bytes()
    bad = good[: len(good) // 3] if damage == "truncated" else good[:1000] + bytes([good[1000] ^ 1]) + good[1001:]
    cache = tmp_path / "cache"
    monkeypatch.setenv("MIPO_CACHE", str(cache))
    target = put_in_fake_package(cache, BUNDLED["llama"].parts[0], bad)
    with pytest.raises(MipoError) as error:
        bundled_model_dir("llama")
    message = str(error.value)
    assert "\n" not in message and str(target) in message and "delete" in message and "sha256" in message
    assert_nothing_converted(cache)


def test_parts_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MIPO_CACHE", str(cache))
    parts = [(f"tiny-part{k}", "1.0", f"tiny_part{k}/data/part{k:02d}.bin") for k in (1, 2)]
    files = [put_in_fake_package(cache, part, content) for part, content in zip(parts, [b"GGUF-first-", b"second"])]
    joined = b"GGUF-first-second"
    monkeypatch.setitem(BUNDLED, "tiny", BundledGGUF(parts=tuple(parts), size=len(joined),
                                                     sha256=hashlib.sha256(joined).hexdigest()))
    assert bundled_gguf("tiny").read_bytes() == joined

    swapped = b"secondGGUF-first-"  # same size, parts in the wrong order
    monkeypatch.setitem(BUNDLED, "other", BundledGGUF(parts=tuple(parts[::-1]), size=len(swapped),
                                                      sha256=hashlib.sha256(joined).hexdigest()))
    with pytest.raises(MipoError) as error:
        bundled_gguf("other")
    assert "\n" not in str(error.value) and all(str(f) in str(error.value) for f in files)
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == ["tiny.gguf"]  # no half-joined file


def test_a_changed_converter_converts_again(tmp_path, monkeypatch):
    """The converted directory is named for the converter: after a change to its code or to the gguf package, a
    bundled model is converted anew, never read from a conversion an older converter made (left as it was)."""
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model("llama"), "llama")
    content = (tmp_path / "tiny.gguf").read_bytes()
    part = ("tiny-gguf", "1.0", "tiny_gguf/model.gguf")
    monkeypatch.setitem(BUNDLED, "tiny", BundledGGUF(parts=(part,), size=len(content),
                                                     sha256=hashlib.sha256(content).hexdigest()))
    cache = tmp_path / "cache"
    monkeypatch.setenv("MIPO_CACHE", str(cache))
    put_in_fake_package(cache, part, content)
    conversions = []
    convert = gguf_convert.convert_gguf
    monkeypatch.setattr(gguf_convert, "convert_gguf",
                        lambda path, out, *generation: conversions.append(out) or convert(path, out, *generation))

    first = bundled_model_dir("tiny")
    assert bundled_model_dir("tiny") == first and conversions == [first]  # cached
    snapshot = {p.name: p.read_bytes() for p in first.iterdir()}
    changed = tmp_path / "gguf_convert.py"  # the converter with one more line: what an edit does
    changed.write_bytes(Path(gguf_convert.__file__).read_bytes() + b"# changed\n")
    monkeypatch.setattr(gguf_convert, "__file__", str(changed))
    second = bundled_model_dir("tiny")
    assert second != first and conversions == [first, second] and second.is_dir()
    version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == "gguf" else version(name))
    third = bundled_model_dir("tiny")
    assert third not in (first, second) and conversions == [first, second, third]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == snapshot


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model("llama"), "llama")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "models" / "tiny")
    assert list((tmp_path / "models").iterdir()) == []
