"""pi_ref and pi of every formula in the paper (docs/walkthrough.md, step 1): one Llama / Qwen2 / Qwen3 decoder
from a Hugging Face directory, with the KV cache the sampler writes; no part of the method. Which directory
--model names: formats/model_sources.py.
"""
import gc
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from formats.files import MipoError, read_json
from formats.hf_files import check_weights, generation_defaults
from formats.model_sources import resolve_model_dir
from formats.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------------
# Config: one dataclass, from a Hugging Face config.json.
# ---------------------------------------------------------------------------------------------------
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass
class ModelConfig:
    model_type: str  # llama | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # Qwen3: not hidden_size / num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...} or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias: True for Qwen2/2.5
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q, k before RoPE
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict, repr=False)  # other config.json fields, written back on save

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in ARCHITECTURES:
            raise MipoError(f"{source}: model_type {model_type!r} is not supported "
                            f"(supported: {', '.join(ARCHITECTURES)})")
        try:
            heads = raw["num_attention_heads"]
            # transformers >= 5: rope_parameters = {"rope_type", "rope_theta", ...}; older: rope_theta + rope_scaling
            rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
            rope_theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            known = set(cls.__dataclass_fields__)
            cfg = cls(
                model_type=model_type,
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads") or heads,
                head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
                rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope_theta),
                rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
                max_position_embeddings=raw.get("max_position_embeddings", 4096),
                tie_word_embeddings=raw.get("tie_word_embeddings", False),
                attention_bias=raw.get("attention_bias", model_type == "qwen2"),
                qk_norm=model_type == "qwen3",
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=raw.get("eos_token_id"),
                extra={k: v for k, v in raw.items() if k not in known and k not in ("rope_parameters", "rope_scaling")},
            )
        except KeyError as e:
            raise MipoError(f"{source}: missing field {e.args[0]!r}")
        except TypeError as e:
            raise MipoError(f"{source}: a field has the wrong type ({e})")
        if cfg.rope_scaling and cfg.rope_scaling["rope_type"] not in ("llama3", "linear"):
            raise MipoError(f"{source}: rope type {cfg.rope_scaling['rope_type']!r} is not supported "
                            "(supported: default, linear, llama3)")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise MipoError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
        return cfg

    def to_dict(self) -> dict:
        out = {**self.extra, **{k: v for k, v in asdict(self).items() if k not in ("extra", "qk_norm", "rope_scaling")}}
        out["architectures"] = [ARCHITECTURES[self.model_type]]
        out["rope_scaling"] = self.rope_scaling
        return out


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) in float32, with the checkpoint's RoPE scaling."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        # Llama 3.1/3.2 (Meta's apply_scaling): long wavelengths slowed by `factor`, short kept, a smooth band between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_context / wavelen - low) / (high - low)).clamp(0, 1)
        inv_freq = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        medium = (wavelen <= old_context / low) & (wavelen >= old_context / high)
        inv_freq = torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, inv_freq)
    return inv_freq


# ---------------------------------------------------------------------------------------------------
# The decoder. Shape legend: B batch, T new tokens, S key/value slots, H query heads, K key/value heads, D head_dim,
# C hidden size, V vocab. Module names are HF's: checkpoint keys map 1:1 onto the state_dict.
# ---------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in float32, cast back before the scale (as HF does)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def apply_rope(x, cos, sin):
    # Half-split (HF): pairs rotated together are (x[i], x[i + D/2]), not (x[2i], x[2i+1])
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def decode_attention(q, k, v, mask):
    """One query per row (a decode step): q (B, H, 1, D), k and v (B, K, S, D), mask broadcastable to (B, 1, 1, S).
    transformers' eager attention (scores in the model dtype, softmax in float32), query heads grouped by a view.
    On a CPU, several times faster in bfloat16 than fused SDPA (tiled for long queries)."""
    B, H, _, D = q.shape
    K = k.shape[1]
    scores = (q.view(B, K, H // K, D) @ k.transpose(-1, -2)) * D**-0.5  # (B, K, H/K, S)
    weights = scores.float().masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype)
    return (weights @ v).view(B, H, 1, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, D = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(C, self.n_heads * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(C, self.n_kv_heads * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(C, self.n_kv_heads * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * D, C, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None, cache_pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        if hasattr(self, "q_norm"):  # Qwen3: per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            # Cache (B, K, S_max, D): write slots cache_pos; with a mask, attend to the first S = its width (fixed S:
            # static shapes), without one to the new tokens alone (a prefill that no earlier slot serves)
            k_cache, v_cache = kv_cache
            k_cache.index_copy_(2, cache_pos, k)
            v_cache.index_copy_(2, cache_pos, v)
            if mask is not None:
                S = mask.shape[-1]
                k, v = k_cache[:, :, :S], v_cache[:, :, :S]  # (B, K, S, D)
        # GQA: each key/value head serves H/K query heads (any ratio, e.g. 7)
        if T == 1 and mask is not None:
            y = decode_attention(q, k, v, mask)
        else:  # no mask: causal, where the fused kernels (flash attention) run
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_heads != self.n_kv_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache=None, cache_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):  # HF's `model.` prefix
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Llama/Qwen2/Qwen3ForCausalLM, differing only in config: q/k/v bias, q/k norm, head_dim, RoPE scaling."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False  # recompute each layer in backward: less memory, ~30% more time

    def forward(self, input_ids, positions=None, mask=None, kv_cache=None, cache_pos=None, logits_index=None):
        """input_ids (B, T) -> logits (B, T, V), float32 when the weights are.

        Alone: causal over positions 0..T-1, with no mask (right padding needs none: real tokens never see the pads
        after them). Others pass positions (B, T) and a bool mask (B, 1, T, S): left padding (the sampler), the packed
        training row (train.collate). The sampler adds a KV cache ((k, v) of (B, K, S_max, D) per layer) and
        cache_pos (T,), the slots to write. logits_index: the positions to project, an int or slice (-1 to sample)
        or (rows, positions) (N,) tensors -> (N, V) (train.py)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        # float32 RoPE tables, shared by all heads and layers
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        cos, sin = emb.cos(), emb.sin()

        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        for i, layer in enumerate(self.model.layers):
            layer_cache = kv_cache[i] if kv_cache is not None else None
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, layer_cache, cache_pos)
        x = self.model.norm(x)
        if isinstance(logits_index, tuple):
            x = x[logits_index]  # (N, C)
        elif logits_index is not None:
            x = x[:, logits_index]
        return self.lm_head(x)  # (B, T, V); (N, V) for an index pair

    def new_kv_cache(self, batch_size: int, max_len: int, dtype=None, device=None):
        cfg, p = self.config, self.lm_head.weight
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)  # (B, K, S_max, D)
        dtype, device = dtype or p.dtype, device or p.device
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(cfg.num_hidden_layers)]


# ---------------------------------------------------------------------------------------------------
# Loading a Hugging Face directory, its files checked first (formats/hf_files.py).
# ---------------------------------------------------------------------------------------------------


def load_weights(model: CausalLM, model_dir: Path) -> None:
    """Copy every checkpoint tensor into the model, cast to its dtype (keys and shapes checked: check_weights)."""
    params = dict(model.state_dict())
    for key, path in check_weights(model_dir, model).items():
        # mmapped pages read stay resident until closed: one open per tensor keeps the peak at the model's size
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                tensor = f.get_tensor(key)
        except Exception as e:
            raise MipoError(f"{path}: cannot read tensor {key!r} ({str(e).splitlines()[0]}); "
                            "re-download or re-convert it")
        with torch.no_grad():
            params[key].copy_(tensor)  # cast while copied: no second copy of the tensor
        del tensor


def check_model(name_or_path, revision=None) -> ModelConfig:
    """What load_model would refuse, found without loading weights (directory, config.json, tokenizer, safetensors
    headers) -> the config."""
    model_dir = resolve_model_dir(name_or_path, revision)
    cfg = ModelConfig.from_dict(read_json(model_dir / "config.json"), str(model_dir / "config.json"))
    Tokenizer(model_dir, cfg)
    with torch.device("meta"):  # the shapes, without memory
        check_weights(model_dir, CausalLM(cfg))
    return cfg


def load_model(name_or_path, device="cpu", dtype=torch.float32, revision=None):
    """A bundled model (`qwen`, `llama`, `smollm2`), local HF directory or hub name (`owner/name`, at revision) ->
    (model, tokenizer), model.generation_defaults set for mipo.resolve_sampling."""
    model_dir = resolve_model_dir(name_or_path, revision)
    cfg = ModelConfig.from_dict(read_json(model_dir / "config.json"), str(model_dir / "config.json"))
    tokenizer = Tokenizer(model_dir, cfg)
    with torch.device("meta"):  # no memory or time spent on a random init
        model = CausalLM(cfg).to(dtype)  # cast while on meta: no float32 copy of a bf16 model at any moment
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty allocates afresh: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)  # meta buffers hold no values
    load_weights(model, model_dir)
    model.name_or_path = str(name_or_path)
    model.generation_defaults = generation_defaults(model_dir)
    return model.eval(), tokenizer


def free_memory() -> None:
    """After `del model`: free its memory now, before the next stage's model loads. A model can sit in a reference
    cycle (its compiled forward holds it), which waits for the cycle collector; on a GPU the allocator's cache is
    emptied too, so that the next stage's memory plan holds."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_model(model: CausalLM, tokenizer: Tokenizer, out_dir) -> Path:
    """Write a Hugging Face directory (config, float32 safetensors, tokenizer files) atomically; generation_config.json
    too: a trained model samples with its base model's defaults."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    try:
        tmp.mkdir(parents=True)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        with open(tmp / "config.json", "w") as f:
            json.dump({**model.config.to_dict(), "torch_dtype": "float32"}, f, indent=2)
        tokenizer.save(tmp)
    except BaseException as e:  # full disk, Ctrl-C: no half-written directory stays
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise MipoError(f"{out_dir}: could not write ({e.strerror or e}); {out_dir} is as it was before")
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def main():
    import argparse

    parser = argparse.ArgumentParser(
        description="Fetch/convert a model once, print its shape, optionally answer a question greedily.",
        epilog="MIPO_CPU_SPEEDUPS=0 in the environment switches off every CPU speed-up (transforms/cpu_speedups.py)."
    )
    parser.add_argument("model", help="bundled name (qwen, llama, smollm2) or a local Hugging Face directory")
    parser.add_argument("question", nargs="?", help="a user message to answer with greedy decoding")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="length limit of the answer")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    args = parser.parse_args()
    try:
        model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
        from transforms import cpu_speedups  # the command's own speed-ups, as train.py's

        cpu_speedups.apply(model)
    except MipoError as e:
        print(f"error: {e}", file=sys.stderr)  # one line, no traceback
        sys.exit(2)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {cfg.model_type}, {n_params / 1e6:.0f}M parameters, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}, "
          f"from {resolve_model_dir(args.model)}")
    if args.question:
        from sampler import generate  # the CLI's one use of the next stage

        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.question}])
        [answer] = generate(model, [prompt], args.max_new_tokens, temperature=0,
                            stop_token_ids=tokenizer.stop_token_ids, progress=False)
        print(tokenizer.decode(answer))


if __name__ == "__main__":
    main()
