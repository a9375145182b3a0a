"""Sharded training (train.py --shard): FSDP2 from PyTorch itself, so that a 7B model with AdamW fits a few GPUs.

The paper fine-tunes Llama-3.2-1B/3B and Qwen2.5-1.5B/3B/7B instruct models in full (its OpenRLHF code uses
DeepSpeed ZeRO-2). Plain training keeps 16 bytes per parameter on every GPU (float32 weights, gradients and two
AdamW moments): 122 GB for Qwen2.5-7B, more than one 80 GB GPU. FSDP2 (`fully_shard`) splits all three over the
ranks and all-gathers one decoder layer's weights at a time, just before that layer runs. This file is the small
library train.py calls for that, plus the memory model that says in advance whether a run fits:

    shard_model          each decoder layer one FSDP unit, the rest (embeddings, final norm, lm_head) the root unit
    shard_batch          this rank's share of the global batch, padded so every rank runs the same forwards
    clip_grad_norm       the global gradient norm over sharded gradients, as a float
    save_sharded         distributed checkpoint (torch.distributed.checkpoint): each rank writes its own shards
    load_sharded         ... and reads them back, into any number of ranks
    full_model_on_rank0  the trained weights gathered into one plain CausalLM on rank 0, for model_loader.save_model
    memory_plan          bytes per rank for parameters, gradients, AdamW, activations and logits, from the config
    choose_layout        the micro-batch and checkpointing that fit a GPU, the global batch kept at 4

    python -m transforms.shard --table                     the Markdown memory table of docs/scaling.md
    python -m transforms.shard --commands                  the torchrun commands of the paper's five models on 1-8 GPUs
    python -m transforms.shard --plan qwen2.5-7b --gpus 4  one memory plan, as train.py prints it before training

Launch: torchrun --nproc_per_node 4 train.py -- --model DIR --preset paper --shard (docs/scaling.md has the
commands for the paper's five models on 1, 2, 4 and 8 GPUs, and on several nodes).
Shape legend: B pairs in a micro-batch, R rows of its forward (two causal rows per pair on a GPU), T tokens per row,
V vocabulary, C hidden size, I MLP width, H query heads, K key/value heads, D head_dim, L layers, N parameters.
"""
import argparse
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # torch >= 2.6
except ImportError:  # torch 2.5: the same FSDP2 under its first name (only 2.13 is tested here)
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

from formats.files import MipoError, run_command
from model_loader import CausalLM, ModelConfig, rope_inv_freq
from transforms import lora

# ---------------------------------------------------------------------------------------------------------------
# The paper's models. Architecture numbers from each model's published config.json (Hugging Face hub copies);
# only what the memory model needs. Qwen2.5 has q/k/v biases, Llama 3.2 none; all five tie embeddings except 7B.
# ---------------------------------------------------------------------------------------------------------------

PAPER_MODELS = {
    # meta-llama/Llama-3.2-1B-Instruct config.json (e.g. github.com/kevinstephano/thunder_model_blocks,
    # hf_llama/llama_config.py, copied from the hub repo): 16 layers, 2048 hidden, 32/8 heads of 64.
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         tie_word_embeddings=True),
    # meta-llama/Llama-3.2-3B-Instruct config.json (huggingface.co/datasets/lhpku20010120/Llama-3.2-3B-Instruct,
    # a verbatim copy): 28 layers, 3072 hidden, 24/8 heads of 128.
    "llama-3.2-3b": dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                         tie_word_embeddings=True),
    # Qwen/Qwen2.5-0.5B(-Instruct) config.json (huggingface.co/osllmai-community/Qwen2.5-0.5B). The bundled
    # `--model qwen` (Qwen2.5-Coder-0.5B-Instruct from GGUF) has the same shapes but an untied lm_head (+136M).
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True),
    # Qwen/Qwen2.5-1.5B-Instruct config.json (huggingface.co/onnx-community/Qwen2.5-1.5B-Instruct).
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True),
    # Qwen/Qwen2.5-3B-Instruct config.json (huggingface.co/osllmai-community/Qwen2.5-3B-Instruct).
    "qwen2.5-3b": dict(model_type="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       tie_word_embeddings=True),
    # Qwen/Qwen2.5-7B-Instruct config.json (huggingface.co/osllmai-community/Qwen2.5-7B-Instruct): untied, and a
    # vocabulary padded to 152064.
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False),
}
HUB_NAMES = {"llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct", "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
             "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
             "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct", "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct"}
GLOBAL_BATCH = 4  # the paper's pairs per optimizer step, whatever the number of GPUs


def paper_config(name: str) -> ModelConfig:
    if name not in PAPER_MODELS:
        raise MipoError(f"--plan {name}: unknown model; one of {', '.join(PAPER_MODELS)}")
    return ModelConfig.from_dict(PAPER_MODELS[name], f"shard.PAPER_MODELS[{name!r}]")


# ---------------------------------------------------------------------------------------------------------------
# Sharding the model. Call on every rank, after init_process_group and before the optimizer is built.
# ---------------------------------------------------------------------------------------------------------------


def shard_model(model: CausalLM, param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype = torch.float32,
                mesh=None) -> CausalLM:
    """FSDP2 in place: every parameter becomes a DTensor holding 1/world of it (dim 0) on this rank.

    param_dtype=torch.bfloat16: the float32 shards stay the master weights that AdamW updates; each all-gather
    casts them to bf16 for the forward and backward, and gradients are reduce-scattered in reduce_dtype (float32)
    into float32 sharded gradients. None: float32 throughout, the numerics of the unsharded float32 run.
    """
    # cast_forward_inputs=False: FSDP would otherwise cast every floating-point input of a layer to param_dtype,
    # and a decoder layer's inputs include the RoPE cos/sin tables, which must stay float32 (a bf16 cos of
    # position 1000 is off by ~4e-3). The hidden state is bf16 anyway: it comes out of the bf16 embedding.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    # One unit per decoder layer: at most a layer or two are ever gathered, and a layer's gradients are
    # reduce-scattered (and its full-size gradient freed) as soon as its backward is done.
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # The root unit takes what is left: embed_tokens, the final norm and lm_head. With tied embeddings lm_head and
    # embed_tokens hold ONE parameter, so they must be in the same unit, and only the root holds both modules.
    # reshard_after_forward=True, which FSDP2 leaves off for the root by default (backward would gather it again at
    # once): otherwise a forward without backward, such as train.py's no-grad reference pass, leaves the root's
    # gathered tensors registered as the model's parameters, an AdamW built next takes them instead of the shards,
    # and the embeddings and lm_head silently never train. The price is one more all-gather of the root per
    # micro-batch.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return model


def shard_batch(batch: list, rank: int, world: int) -> tuple[list, list[float]]:
    """This rank's pairs of a global batch, and each one's weight in the summed loss.

    Every rank gets ceil(G / world) slots, filled in rank order: rank r holds pairs r*slots ... r*slots+slots-1.
    Slots past the end of the batch (world > G, or G not a multiple of world) hold a copy of a real pair with
    weight 0: under FSDP every rank must run the same forwards and backwards, since each layer's all-gather is a
    collective, so a rank with nothing to do still computes, and contributes an exactly-zero gradient.
    The weight of a real pair is world / G: FSDP averages the ranks' gradients (divides by world), so
    sum over ranks of (world / G) * sum of its pairs' gradients / world = the mean over the G pairs, as in one
    process. Gathering the per-slot metrics of all ranks in rank order and keeping the first G rows gives exactly
    the G pairs, in the batch's order.
    """
    G = len(batch)
    slots = math.ceil(G / world)
    mine, weights = [], []
    for s in range(rank * slots, (rank + 1) * slots):
        mine.append(batch[s % G])
        weights.append(world / G if s < G else 0.0)
    return mine, weights


def every_rank(flag: bool, device="cpu") -> bool:
    """True when flag is True on every rank. For decisions that skip work, such as a resumed reference pass skipping
    a micro-batch it has already scored: under FSDP all ranks must skip the same forwards, or they deadlock."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)  # nccl reduces GPU tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def clip_grad_norm(model, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ over the sharded gradients: the norm of the full gradient, the same number the
    unsharded run logs. It works on DTensors as is (the shards' squared norms are all-reduced) and returns a
    replicated DTensor, which .full_tensor() turns back into a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.item()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints. torch.distributed.checkpoint: every rank writes and reads its own shards of the weights and AdamW
# states, in parallel, and nobody ever holds a full copy. A checkpoint saved by N ranks loads into M ranks.
# ---------------------------------------------------------------------------------------------------------------


def save_sharded(path, model, optimizer, extra: dict):
    """Collective: every rank calls it. path is a directory (on a filesystem all nodes share); extra is small
    JSON-able state from rank 0 (the step, RNG states), written as extra.json. Atomic: written under path.tmp,
    then rank 0 renames it. Only tensors go through torch.distributed.checkpoint: AdamW's hyperparameters
    (param_groups) are not saved, since train.py builds the optimizer with them and sets the lr every step."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    rank = dist.get_rank()
    if rank == 0 and tmp.exists():  # what a kill during an earlier save left
        shutil.rmtree(tmp)
    dist.barrier()
    # get_state_dict names every tensor by its parameter's name (optimizer states too), so the files do not
    # depend on the order parameters were handed to AdamW, or on how many ranks wrote them.
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state["state"]}, checkpoint_id=str(tmp))
    if rank == 0:
        with open(tmp / "extra.json", "w", encoding="utf-8") as f:
            json.dump(extra, f)
            f.flush()
            os.fsync(f.fileno())
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        # Directories cannot be swapped in one rename: old aside, new in, old removed. A kill in between leaves
        # path.old, which load_sharded falls back to.
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_sharded(path, model, optimizer) -> dict | None:
    """Collective. Fills the sharded model and optimizer in place from save_sharded's directory and returns its
    extra dict; None when there is no checkpoint (a fresh run)."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists():
        if not old.exists():
            return None
        path = old  # a save was killed between its two renames: the previous checkpoint is complete
    if not (path / ".metadata").exists() or not (path / "extra.json").exists():
        raise MipoError(f"{path}: not a complete sharded checkpoint (no .metadata or extra.json); delete it to "
                        "start over")
    reader = TensorCheckpointReader(path)
    # a foreign or damaged .metadata fails here, one MipoError on every rank, not inside dcp.load
    reader.read_metadata()
    model_state, optimizer_state = get_state_dict(model, optimizer)  # the layout to fill, sharded like the model
    state = {"model": model_state, "optimizer": optimizer_state["state"]}
    dcp.load(state, storage_reader=reader)  # in place, each rank reading only its own shards
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optimizer_state)
    try:
        return json.loads((path / "extra.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MipoError(f"{path / 'extra.json'}: not valid JSON ({e}); delete {path} to start over")


# What a torch.distributed.checkpoint .metadata file may name: the checkpoint format's own classes and torch's
# value types (pickle.find_class asks for each class before it builds one).
METADATA_CLASSES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                    ("pathlib", "WindowsPath"), ("collections", "OrderedDict"),
                    ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
METADATA_CLASSES |= {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in METADATA_CLASSES \
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata class")


class TensorCheckpointReader(dcp.FileSystemReader):
    """torch.distributed.checkpoint reads .metadata with a plain pickle.load, which runs whatever a crafted file
    names, and loads non-tensor entries with an unrestricted torch.load. This reader first unpickles .metadata
    with MetadataUnpickler and accepts only tensor entries (all save_sharded writes), so a checkpoint directory from
    elsewhere can hold weights, never code."""

    def read_metadata(self, *args, **kwargs):
        metadata_path = Path(self.path) / ".metadata"
        try:
            with open(metadata_path, "rb") as f:
                metadata = MetadataUnpickler(f).load()
        except Exception as e:
            raise MipoError(f"{metadata_path}: not a checkpoint train.py wrote ({str(e).splitlines()[0][:200]}); "
                            f"delete {self.path} to start over")
        entries = getattr(metadata, "state_dict_metadata", None)
        tensors = dcp.metadata.TensorStorageMetadata
        if not isinstance(entries, dict) or not all(isinstance(entry, tensors) for entry in entries.values()):
            raise MipoError(f"{metadata_path}: holds entries that are not tensors, which train.py never writes; "
                            f"delete {self.path} to start over")
        return super().read_metadata(*args, **kwargs)  # the same bytes, now known to name only the classes above


def full_model_on_rank0(model: CausalLM) -> CausalLM | None:
    """Collective. The sharded model's weights gathered, one tensor at a time, into a plain float32 CausalLM on
    rank 0's CPU (None on the other ranks), which model_loader.save_model writes as a Hugging Face directory.
    Rank 0 needs host memory for one float32 copy of the model (30 GB for 7B); no GPU holds a full copy."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):  # no memory for a random init that is overwritten
        full = CausalLM(model.config)
    full.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)  # strict: every key, every shape
    if model.config.tie_word_embeddings:  # assign= gave the two names two tensors; tie again, as load_model does
        full.lm_head.weight = full.model.embed_tokens.weight
    full.inv_freq = rope_inv_freq(model.config)  # a non-persistent buffer: not in any state dict
    full.name_or_path = getattr(model, "name_or_path", None)
    return full.eval()


# ---------------------------------------------------------------------------------------------------------------
# The memory model: bytes per rank, from the config alone. Strategies as train.py runs them:
#   single / ddp  float32 weights, gradients and AdamW on every GPU; matmuls in bf16 under autocast
#   fsdp          float32 shards of weights, gradients and AdamW (1/world each); bf16 all-gathered layers
# ---------------------------------------------------------------------------------------------------------------


def count_parameters(cfg: ModelConfig) -> dict:
    """Parameters per part, exactly as CausalLM builds them: {"embed", "lm_head", "layer", "norm", "total"}."""
    C, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    attention = C * H * D + 2 * C * K * D + H * D * C  # q, k, v, o projections
    if cfg.attention_bias:
        attention += H * D + 2 * K * D  # q, k, v biases (Qwen2)
    if cfg.qk_norm:
        attention += 2 * D  # Qwen3's per-head q and k RMSNorm weights
    layer = attention + 3 * C * I + 2 * C  # + SwiGLU (gate, up, down) + two RMSNorm weights
    embed = cfg.vocab_size * C
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * C
    total = embed + lm_head + cfg.num_hidden_layers * layer + C
    return {"embed": embed, "lm_head": lm_head, "layer": layer, "norm": C, "total": total}


def activation_bytes_per_token(cfg: ModelConfig, act_bytes: int) -> int:
    """Bytes one decoder layer keeps for backward per token (model_loader.DecoderLayer, GPU attention kernel).

    Two RMSNorms each keep their float32 normalized input (4C) and their output (aC); attention keeps q, k, v
    after RoPE (a(H + 2K)D), its output (aHD) and a float32 log-sum-exp per head (4H); SwiGLU keeps gate, up,
    silu(gate) and their product (4aI). The inputs of q/k/v and gate/up are the norms' outputs, counted once.
    On a GPU, training's rows are causal with no mask (train.collate, train.PACKED), so scaled_dot_product_attention
    runs the flash kernel, which keeps no (T, T) probabilities, only that log-sum-exp (this plan is for GPUs).
    """
    a, C, I, D = act_bytes, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    return 2 * (4 * C + a * C) + a * (H + 2 * K) * D + a * H * D + 4 * H + 4 * a * I


def memory_plan(cfg: ModelConfig, world_size: int = 1, strategy: str = "fsdp", gradient_checkpointing: bool = False,
                micro_batch_pairs: int = 1, prompt_tokens: int = 512, response_tokens: int = 512,
                param_bytes: int = 2, master_bytes: int = 4, logits_chunk_tokens: int = 256, lora_rank: int = 0,
                lora_targets=lora.TARGETS) -> dict:
    """Peak bytes per rank of one training step, by what holds them. An estimate to about +-20%: it leaves out
    the CUDA context and allocator slack (1-3 GB), and counts everything as alive at once.

    A micro-batch of B pairs is 2B causal rows of T = prompt + response tokens (train.collate on a GPU: [x, y+] and
    [x, y-], no mask) with logits over the 2 * response positions that score them. param_bytes is the
    compute dtype (2: bf16), master_bytes the dtype of the weights AdamW updates (4: float32). With lora_rank,
    gradients and AdamW states are the adapters' only (transforms/lora.py); the frozen weights stay.
    """
    if strategy not in ("single", "ddp", "fsdp"):
        raise MipoError(f"strategy {strategy!r}: one of single, ddp, fsdp")
    if strategy == "single" and world_size != 1:
        raise MipoError(f"strategy single runs on 1 GPU, not {world_size}")
    counts = count_parameters(cfg)
    N, L, C, V = counts["total"], cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    ways = world_size if strategy == "fsdp" else 1  # how many ranks split the float32 states
    trained = lora.adapter_parameters(cfg, lora_rank, lora_targets) if lora_rank else N
    plan = {
        "parameters": master_bytes * (N + (trained if lora_rank else 0)) / ways,  # float32: the master weights
        "gradients": master_bytes * trained / ways,  # float32 (FSDP reduce-scatters them in float32)
        "optimizer": 2 * 4 * trained / ways,  # AdamW's exp_avg and exp_avg_sq, float32
    }
    if strategy == "fsdp":
        # All-gathered bf16 weights: the root unit (embeddings, lm_head, final norm) is gathered for the whole
        # forward and again for the whole backward, a layer is gathered while the next one is prefetched; in
        # backward one layer's full bf16 gradient and its float32 copy for the reduce-scatter exist until the
        # reduce-scatter.
        root = counts["embed"] + counts["lm_head"] + counts["norm"]
        plan["gathered"] = param_bytes * (root + 2 * counts["layer"]) + (param_bytes + 4) * counts["layer"]
    else:
        # autocast keeps a bf16 copy of every weight it casts from forward to backward (none in float32 compute);
        # DDP also copies gradients into its communication buckets (gradient_as_bucket_view=False, the default).
        plan["gathered"] = param_bytes * N if param_bytes < master_bytes else 0
        if strategy == "ddp":
            plan["gathered"] += master_bytes * trained
    T = prompt_tokens + response_tokens
    tokens = micro_batch_pairs * 2 * T
    # The residual stream is bf16 under FSDP (bf16 weights) but float32 under autocast over float32 weights.
    residual_bytes = param_bytes if strategy == "fsdp" else master_bytes
    per_layer = activation_bytes_per_token(cfg, param_bytes) * tokens
    if gradient_checkpointing:  # each layer keeps its input; backward recomputes one layer at a time
        plan["activations"] = L * residual_bytes * C * tokens + per_layer
    else:
        plan["activations"] = L * per_layer
    # Logits: kept for backward in the compute dtype, and their gradient as large; dpo_loss.token_logps adds a
    # float32 chunk (and its exponentials) of logits_chunk_tokens positions, in forward and again in backward.
    logit_positions = micro_batch_pairs * 2 * response_tokens
    plan["logits"] = 2 * param_bytes * logit_positions * V + 2 * 4 * min(logits_chunk_tokens, logit_positions) * V
    plan["total"] = sum(plan.values())
    plan["meta"] = dict(strategy=strategy, world_size=world_size, gradient_checkpointing=gradient_checkpointing,
                        micro_batch_pairs=micro_batch_pairs, tokens_per_row=T, parameters=N, lora_rank=lora_rank,
                        trained=trained)
    return plan


def sampling_plan(cfg: ModelConfig, sample_batch_size: int = 16, prompt_tokens: int = 512, new_tokens: int = 512,
                  param_bytes: int = 2) -> dict:
    """Stage 1 (sampling) is not sharded: each rank generates its share of the prompts with a whole bf16 copy of the
    model, since an FSDP all-gather of every layer for every decoded token would cost more than the copy. The copy
    is freed before training. Bytes: the weights and the preallocated KV cache (sampler.py: (B, K, S, D) per layer
    for keys and for values)."""
    slots = prompt_tokens + new_tokens
    kv_cache = (cfg.num_hidden_layers * 2 * sample_batch_size * cfg.num_key_value_heads * slots * cfg.head_dim
                * param_bytes)
    weights = param_bytes * count_parameters(cfg)["total"]
    return {"weights": weights, "kv_cache": kv_cache, "total": weights + kv_cache}


def format_memory_plan(plan: dict, gpu_bytes: float | None = None, sampling: dict | None = None) -> str:
    """A few lines for train.py to print before training: per rank, what holds memory, and whether it fits."""
    m = plan["meta"]
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    ckpt = "with" if m["gradient_checkpointing"] else "without"
    adapters = f" (LoRA rank {m['lora_rank']}: {m['trained'] / 1e6:.1f}M trained)" if m.get("lora_rank") else ""
    lines = [f"memory plan per rank ({m['strategy']}, {m['world_size']} rank(s), {m['parameters'] / 1e9:.2f}B "
             f"parameters{adapters}, micro-batch {m['micro_batch_pairs']} pair(s), rows of {m['tokens_per_row']} "
             f"tokens, {ckpt} "
             "gradient checkpointing):",
             f"  parameters {gib(plan['parameters'])}, gradients {gib(plan['gradients'])}, AdamW states "
             f"{gib(plan['optimizer'])}, gathered/working weights {gib(plan['gathered'])}",
             f"  activations {gib(plan['activations'])}, logits {gib(plan['logits'])}; total about "
             f"{gib(plan['total'])}"]
    if gpu_bytes:
        verdict = "fits" if plan["total"] <= gpu_bytes else "does NOT fit"
        lines[-1] += f": {verdict} in {gib(gpu_bytes)}"
    if sampling:
        lines.append(f"  sampling (stage 1, before training): a whole bf16 copy {gib(sampling['weights'])} + KV cache "
                     f"{gib(sampling['kv_cache'])} = {gib(sampling['total'])}")
    return "\n".join(lines)


def choose_layout(cfg: ModelConfig, world_size: int, strategy: str, gpu_bytes: float, global_batch: int = GLOBAL_BATCH,
                  gradient_checkpointing: bool | None = None, reserve_bytes: float = 3 * 2**30, margin: float = 1.15,
                  **plan_options) -> dict:
    """The --preset paper sizing: the largest micro-batch (fewest accumulation steps) whose plan, times margin,
    fits gpu_bytes less reserve_bytes (CUDA context, allocator slack), first without gradient checkpointing
    (faster), then with it. The 15% margin stands until measured GPU peaks calibrate memory_plan.
    The global batch stays global_batch in every case: slots = ceil(G / world) pairs per rank (shard_batch), run
    as slots / micro-batch accumulation steps. Returns {"micro_batch_pairs", "gradient_checkpointing", "plan"};
    a one-line MipoError when nothing fits."""
    budget = gpu_bytes - reserve_bytes
    slots = math.ceil(global_batch / world_size)
    options = (False, True) if gradient_checkpointing is None else (gradient_checkpointing,)
    for checkpointing in options:
        for micro in sorted({d for d in range(1, slots + 1) if slots % d == 0}, reverse=True):
            plan = memory_plan(cfg, world_size, strategy, checkpointing, micro, **plan_options)
            if plan["total"] * margin <= budget:
                return {"micro_batch_pairs": micro, "gradient_checkpointing": checkpointing, "plan": plan}
    smallest = memory_plan(cfg, world_size, strategy, options[-1], 1, **plan_options)["total"]
    raise MipoError(f"about {smallest / 2**30:.0f} GiB per rank even at micro-batch 1 ({strategy}, {world_size} "
                    f"rank(s){', gradient checkpointing' if options[-1] else ''}), more than the {budget / 2**30:.0f} "
                    f"GiB usable of {gpu_bytes / 2**30:.0f}; add --shard or more GPUs (docs/scaling.md)")


def memory_table(models=("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "llama-3.2-1b", "llama-3.2-3b"),
                 gpus=(2, 4, 8),
                 **plan_options) -> str:
    """docs/scaling.md's table: GiB per rank, without / with gradient checkpointing, micro-batch 1."""
    layouts = [("single", 1), ("ddp", 2)] + [("fsdp", g) for g in gpus]
    head = ["model", "params", *[f"{s} x{g}" if s != "single" else "1 GPU" for s, g in layouts]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in models:
        cfg = paper_config(name)
        cells = []
        for strategy, world in layouts:
            off, on = (memory_plan(cfg, world, strategy, ckpt, **plan_options)["total"] / 2**30
                       for ckpt in (False, True))
            cells.append(f"{off:.1f} / {on:.1f}")
        rows.append(f"| {HUB_NAMES[name]} | {count_parameters(cfg)['total'] / 1e9:.2f}B | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def lora_table(rank: int = 16, models=("llama-3.2-1b", "llama-3.2-3b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b"),
               **plan_options) -> str:
    """docs/scaling.md's LoRA rows: GiB on one GPU, every weight trained against rank-`rank` adapters on every linear
    layer of attention and MLP (transforms/lora.py), without / with gradient checkpointing, micro-batch 1."""
    rows = [f"| model | adapter parameters | every weight, 1 GPU | LoRA rank {rank}, 1 GPU |", "|---|---|---|---|"]
    for name in models:
        cfg = paper_config(name)
        cells = []
        for lora_rank in (0, rank):
            off, on = (memory_plan(cfg, 1, "single", ckpt, lora_rank=lora_rank, **plan_options)["total"] / 2**30
                       for ckpt in (False, True))
            cells.append(f"{off:.1f} / {on:.1f}")
        rows.append(f"| {HUB_NAMES[name]} | {lora.adapter_parameters(cfg, rank) / 1e6:.1f}M | " + " | ".join(cells)
                    + " |")
    return "\n".join(rows)


def breakdown_table(name: str = "qwen2.5-7b", gpus=(1, 2, 4, 8), **plan_options) -> str:
    """One model's plan, part by part, FSDP on each number of GPUs (with gradient checkpointing)."""
    cfg = paper_config(name)
    parts = ("parameters", "gradients", "optimizer", "gathered", "activations", "logits", "total")
    rows = ["| " + " | ".join([f"{HUB_NAMES[name]}, GiB per rank", "1 GPU", *[f"fsdp x{g}" for g in gpus]]) + " |",
            "|" + "---|" * (len(gpus) + 2)]
    plans = [memory_plan(cfg, 1, "single", True, **plan_options)]
    plans += [memory_plan(cfg, g, "fsdp", True, **plan_options) for g in gpus]
    for part in parts:
        rows.append(f"| {part} | " + " | ".join(f"{p[part] / 2**30:.1f}" for p in plans) + " |")
    return "\n".join(rows)


def paper_commands(task: str = "persona", models_dir: str = "/models", gpu_gib: float = 80.0) -> str:
    """docs/scaling.md's commands: the paper's five models on 1, 2, 4 and 8 GPUs of gpu_gib each, with the
    micro-batch and checkpointing choose_layout picks (--preset paper picks the same when the flags are left out)."""
    rows = ["| model | GPUs | command | plan per GPU |", "|---|---|---|---|"]
    for name in ("llama-3.2-1b", "llama-3.2-3b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b"):
        cfg, model_dir = paper_config(name), f"{models_dir}/{HUB_NAMES[name].split('/')[1]}"
        for gpus in (1, 2, 4, 8):
            strategy = "single" if gpus == 1 else "fsdp"
            try:
                layout = choose_layout(cfg, gpus, strategy, gpu_gib * 2**30)
            except MipoError:
                rows.append(f"| {HUB_NAMES[name]} | {gpus} | does not fit: 16 bytes per parameter on one GPU | "
                            f"{memory_plan(cfg, 1, 'single', True)['total'] / 2**30:.0f} GiB |")
                continue
            launcher = "python train.py" if gpus == 1 else f"torchrun --standalone --nproc_per_node {gpus} train.py --"
            flags = f"--model {model_dir} --preset paper --task {task}" + ("" if gpus == 1 else " --shard")
            flags += f" --micro-batch-size {layout['micro_batch_pairs']}"
            flags += " --gradient-checkpointing" if layout["gradient_checkpointing"] else ""
            rows.append(f"| {HUB_NAMES[name]} | {gpus} | `{launcher} {flags}` | "
                        f"{layout['plan']['total'] / 2**30:.0f} GiB |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description="The memory model of sharded training (docs/scaling.md).")
    parser.add_argument("--table", action="store_true", help="print the Markdown memory table of docs/scaling.md")
    parser.add_argument("--commands", action="store_true",
                        help="print the paper's five models' commands on 1, 2, 4, 8 GPUs")
    parser.add_argument("--plan", choices=PAPER_MODELS, default=None, help="print one model's memory plan")
    parser.add_argument("--gpus", type=int, default=1, help="--plan: ranks (default 1)")
    parser.add_argument("--strategy", choices=("single", "ddp", "fsdp"), default="fsdp",
                        help="--plan: how the model is spread (default fsdp)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="--plan: recompute each layer in backward")
    parser.add_argument("--micro-batch-pairs", type=int, default=1, help="--plan: pairs per forward (default 1)")
    parser.add_argument("--gpu-gib", type=float, default=80.0,
                        help="--plan, --commands: GPU memory to check the plan against (default 80)")
    args = parser.parse_args(argv)
    if args.table:
        print(memory_table())
        print()
        print(breakdown_table())
        print()
        print(lora_table())
    if args.commands:
        print(paper_commands(gpu_gib=args.gpu_gib))
    if args.plan:
        cfg = paper_config(args.plan)
        plan = memory_plan(cfg, args.gpus, args.strategy, args.gradient_checkpointing, args.micro_batch_pairs)
        print(format_memory_plan(plan, args.gpu_gib * 2**30, sampling_plan(cfg)))
    if not (args.table or args.commands or args.plan):
        parser.print_help()


if __name__ == "__main__":
    run_command(main)
