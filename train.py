"""MIPO training, the command a user runs (Nam, Li, Jaques 2026, section 3): the base model samples its own
preference pairs, they are scored once under the frozen base model, then one epoch of DPO on them, and the
result is saved as a Hugging Face model. It orders the stages and holds no method of its own: the pairs are
mipo.py's, the loss dpo_loss.py's; beyond the held-out MI meter it measures nothing (the paper's tables are eval.py's).

    python train.py --model qwen                      # CPU preset: a small persona run, about 5 minutes
    python train.py --model qwen --preset paper       # the paper's settings, for a GPU
    torchrun --nproc_per_node 2 train.py -- --model qwen --n 64   # DDP: gloo on CPU, nccl on GPU (the -- keeps
                                                                   # torchrun from reading --n as its --nnodes)

Every stage writes a file in the run directory (--out) and is skipped when that file is complete, so the same
command, run again after a kill, resumes where the last run stopped:
    config.json       the settings; a rerun with incompatible settings is refused
    pairs.jsonl       stage 1, mipo.build_pairs: TRL's conversational preference format (+ x', the sampling)
    eval_pairs.jsonl  stage 1, the same for held-out prompts; base_eval.json: the base model's meter on them
    reference.jsonl   stage 2, one line per pair: token ids, lengths, ref_chosen_logps, ref_rejected_logps
    checkpoint.pt     stage 3, every --save-every steps: model, AdamW, step (data position and lr), RNG states
    metrics.jsonl     stage 3, one line per optimizer step, under TRL's metric names
    final/            stage 4, the trained model: config.json, model.safetensors, tokenizer files, chat template
    summary.json      the step-0 check, the last step's metrics, the held-out meter before and after

Shape legend: B pairs in a micro-batch, R rows in its forward (B: one row holds a prompt and both responses;
2B for infonce and sami, which also score both responses under x'), T padded tokens, V vocabulary.
"""
import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import mipo
import shard
from dpo_loss import F_DIVERGENCES, LOSS_TYPES, check_options, preference_loss, preference_metrics, sequence_logps
from model_loader import (MipoError, ModelConfig, cpu_has_fast_bf16, load_model, local_model, read_json, resolve_model_dir,
                          save_model)
from sampler import set_glibc_malloc

# ---------------------------------------------------------------------------------------------------------------
# Settings: one dataclass per concern, then the presets. A flag left out takes the preset's value.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PairsConfig:  # stage 1: which prompts, which negatives, how responses are sampled
    model: str = "qwen"
    task: str = "persona"
    data: str | None = None  # --task jsonl: the prompts file
    eval_data: str | None = None  # --task jsonl: a held-out prompts file (default: every fifth item of data)
    negative: str | None = None  # random | incomplete | random-resample; None: the task's (MIPO section 3)
    n: int | None = 64  # training prompts, hence pairs; None: the whole training split
    n_eval: int = 16  # held-out prompts for the pointwise-MI meter and the task metric; 0: none
    pairs_file: str | None = None  # an existing pairs file instead of sampling
    sampling: mipo.Sampling | None = None  # None: the task's (paper or CPU) settings
    sample_batch_size: int = 16  # prompts per generate call (mipo.build_pairs; it fixes the sampling seeds)
    seed: int = 0
    drop_truncated: bool = False  # train only on pairs whose two responses both ended before max_new_tokens


@dataclass
class LossConfig:  # stage 3: the preference loss, dpo_loss.preference_loss(loss, ..., beta, **options)
    loss: str = "sigmoid"  # MIPO is plain sigmoid DPO; everything else is an ablation
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    rpo_alpha: float | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    bco_delta: float | None = None
    temperature: float = 1.0  # infonce / sami

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("loss", "beta")}


@dataclass
class OptimConfig:  # stage 3: AdamW and the schedule; the defaults are the paper's (its code is an OpenRLHF fork)
    lr: float = 5e-7
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03  # linear warmup over 3% of the steps ...
    min_lr_ratio: float = 0.1  # ... then cosine down to 0.1 x lr
    grad_clip: float = 1.0
    epochs: int = 1
    batch_size: int = 4  # global: pairs per optimizer step, over all processes and micro-batches
    micro_batch_size: int = 4  # pairs per forward; the update does not depend on it (up to float rounding)
    seed: int = 0  # data order: a permutation per epoch from (seed, epoch)


@dataclass
class HardwareConfig:
    device: str = "cpu"
    dtype: str = "float32"  # compute dtype: bfloat16 = matmuls under autocast; weights and AdamW stay float32
    gradient_checkpointing: bool = False
    shard: bool = False  # FSDP2 over the torchrun processes (shard.py)
    save_every: int = 25  # optimizer steps between checkpoints


PRESETS = {
    # `python train.py --model qwen` on 2 idle CPU cores, end to end in 4 minutes (pairs 56 s, reference 18 s, DPO
    # 137 s, held-out meter 25 s). 64 pairs at batch 4 are 16 optimizer steps; at the paper's lr of 5e-7
    # the policy would barely move in 16 steps, so this preset trains 4x faster. Measured on Qwen2.5-0.5B, persona:
    # lr 2e-6 raises the held-out pointwise MI from 17 to 30 nats with the chosen rewards near 0; 1e-5 overshoots
    # (chosen log-probs down by 45 nats, the held-out preference score down). Sampling: the task's CPU settings.
    "cpu": dict(n=64, n_eval=16, lr=2e-6, batch_size=4, micro_batch_size=4, save_every=8, sampling="cpu"),
    # The paper: every training prompt, 512 new tokens, lr 5e-7, global batch 4, beta 0.1, one epoch.
    "paper": dict(n=None, n_eval=200, lr=5e-7, batch_size=4, micro_batch_size=4, save_every=100, sampling="paper"),
}

# Settings that may change between a run and its resumption: they change how the work is done, not the result.
MAY_CHANGE = {"hardware.device", "hardware.gradient_checkpointing", "hardware.save_every"}
# The losses that compare a pair against the other pairs of the same forward: a split of the global batch
# into micro-batches changes what they compute, so only these break gradient-accumulation equivalence.
BATCH_COUPLED_LOSSES = ("aot", "aot_unpaired", "bco_pair")
LN2 = math.log(2)
STEP0_TOLERANCE = 1e-3  # nats, on summed log-probs: see step0_check


# ---------------------------------------------------------------------------------------------------------------
# Processes: one, or several under torchrun. Rank 0 writes the shared files; every rank trains.
# ---------------------------------------------------------------------------------------------------------------


def init_distributed(device: str):
    """(rank, world_size, device) from torchrun's environment; a plain `python train.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    # Generous timeout: ranks wait at barriers while rank 0 alone writes files or measures the held-out meter.
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=6))
    return rank, world, device


def barrier(world: int):
    if world > 1:
        dist.barrier()


def autocast(cfg: HardwareConfig):
    device_type = torch.device(cfg.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def return_freed_memory_to_the_os():
    """Each time a block above glibc's mmap threshold is freed, glibc raises the threshold (up to 32 MiB), so later
    tensors of that size come from its heap, and freed heap memory stays resident: a CPU run's resident memory
    then holds activation buffers long freed and creeps up step by step. A fixed 1 MiB threshold
    (M_MMAP_THRESHOLD) gives every large tensor its own mapping, returned to the OS when the tensor is freed.
    Measured: peak 3.15 -> 2.90 GiB on SmolLM2-135M with gradient checkpointing, and no creep. Set when DPO
    starts: sampling, which allocates large short-lived tensors every step, runs 1.7x slower with it (page
    faults), and sets the opposite (sampler.keep_freed_memory_for_reuse), whose trim threshold is reset here
    to glibc's default. Elsewhere than glibc it does nothing."""
    set_glibc_malloc(mmap_threshold=1 << 20, trim_threshold=128 << 10)


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines only: a last line without its newline is what a kill mid-write leaves, and is dropped."""
    data = path.read_text(encoding="utf-8") if path.exists() else ""
    return [json.loads(line) for line in data.split("\n")[:-1] if line.strip()]


def crash_hook(crash_at: str | None, stage: str, count: int):
    # Test hook (--_crash-at STAGE:K): SIGKILL this process after the K-th unit of work of a stage, which is
    # what a power cut or the OOM killer does. The resume tests rerun the command and compare final weights.
    if crash_at == f"{stage}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: pairs. For each prompt x the base model samples y+ from x and y- from x' (another prompt, or x
# without its context); both are stored under x (MIPO section 3). mipo.build_pairs does the work and resumes.
# ---------------------------------------------------------------------------------------------------------------


def make_pairs(cfg: PairsConfig, hw: HardwareConfig, out: Path, rank: int, world: int):
    """-> (training pairs, held-out pairs, the base model's held-out meter or None)."""
    task = mipo.get_task(cfg.task)
    pairs_path, eval_path, base_eval_path = out / "pairs.jsonl", out / "eval_pairs.jsonl", out / "base_eval.json"
    settings = mipo.sampling_settings(cfg.sampling, cfg.seed, cfg.model)
    if cfg.pairs_file:
        train_examples, pairs = None, read_pairs_file(Path(cfg.pairs_file), cfg)
    else:
        train_examples = mipo.load_examples(task, "train", cfg.n, cfg.data, cfg.eval_data)
        pairs = mipo.read_complete_pairs(pairs_path, task, train_examples, cfg.negative, settings)
    eval_examples = mipo.load_examples(task, "eval", cfg.n_eval, cfg.data, cfg.eval_data) if cfg.n_eval > 0 else []
    eval_pairs = mipo.read_complete_pairs(eval_path, task, eval_examples, cfg.negative, settings) if eval_examples else []
    base_eval = json.loads(base_eval_path.read_text()) if base_eval_path.exists() else None
    if pairs is not None and eval_pairs is not None and (base_eval is not None or not eval_examples):
        return pairs, eval_pairs, base_eval

    # Sampling runs with the weights in the compute dtype: the sampler's KV cache holds the weights' dtype, and
    # bf16 matmuls are several times faster on a CPU with AVX-512 BF16 / AMX and on a GPU.
    dtype = torch.bfloat16 if hw.dtype == "bfloat16" else torch.float32
    model, tokenizer = load_model(cfg.model, hw.device, dtype)
    if pairs is None:
        pairs = build_sharded(model, tokenizer, task, train_examples, pairs_path, cfg, rank, world)
    if eval_pairs is None:
        eval_pairs = build_sharded(model, tokenizer, task, eval_examples, eval_path, cfg, rank, world)
    if eval_pairs and rank == 0 and base_eval is None:
        # The held-out pairs' chosen responses are the base model's own samples from x: the meter before training.
        mipo.use_recorded_date(tokenizer, eval_pairs, eval_path)
        base_eval = held_out_meter(model, tokenizer, task, eval_examples, eval_pairs)
        base_eval["pmi_self"] = base_eval["pmi"]  # the base model's own samples, scored by itself
        mipo.write_atomically(base_eval_path, json.dumps(base_eval, indent=2))
    barrier(world)
    base_eval = json.loads(base_eval_path.read_text()) if base_eval_path.exists() else None
    del model
    return pairs, eval_pairs, base_eval


def build_sharded(model, tokenizer, task, examples, path: Path, cfg: PairsConfig, rank, world) -> list[dict]:
    if world == 1:
        return mipo.build_pairs(model, tokenizer, task, examples, path, cfg.negative, cfg.sampling, cfg.seed,
                                cfg.sample_batch_size, cfg.model)
    # Under torchrun each rank samples every world-th batch of prompts into its own samples file, with the batch's
    # own seed, then rank 0 writes the pairs from all of them: the very pairs one process samples.
    sample_files = [mipo.samples_path(path, (r, world)) for r in range(world)]
    if not path.exists():
        mipo.sample_pairs(model, tokenizer, task, examples, sample_files[rank], cfg.negative, cfg.sampling, cfg.seed,
                          cfg.sample_batch_size, cfg.model, progress=rank == 0, shard=(rank, world))
    barrier(world)
    if rank == 0 and not path.exists():
        mipo.write_pairs(task, examples, sample_files, path, cfg.negative, cfg.seed)
    barrier(world)
    return mipo.read_pairs(path)


def read_pairs_file(path: Path, cfg: PairsConfig) -> list[dict]:
    """--pairs FILE: pairs sampled earlier. They must come from the model being trained: DPO's reference is that
    model, and MIPO's pairs are its own samples."""
    pairs = mipo.read_pairs(path)
    for pair in pairs:
        sampled_by = str(pair["sampling"].get("model", "")) if isinstance(pair["sampling"], dict) else ""
        if not same_model(sampled_by, cfg.model):
            raise MipoError(f"{path}: pair {pair['id']!r} was sampled by model {sampled_by!r}, not --model {cfg.model}; "
                            "sample pairs with this model (leave out --pairs) or pass the model that sampled them")
        if pair["task"] != cfg.task:
            raise MipoError(f"{path}: pair {pair['id']!r} is from task {pair['task']!r}, not --task {cfg.task}")
    if not pairs:
        raise MipoError(f"{path}: no pairs in the file (--pairs)")
    return pairs[:cfg.n] if cfg.n else pairs


def same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: frozen reference log-probs. One no-grad pass of the base model over every pair, chosen and rejected
# scored under the original prompt x (MIPO section 3), stored with the token ids. Training then needs no
# reference model in memory: pi_ref enters DPO's loss (DPO Eq. 7) only through these numbers.
# ---------------------------------------------------------------------------------------------------------------


def tokenize_pair(tokenizer, pair: dict, with_negative_prompt: bool, context_window: int) -> dict:
    # The completion is what the chat template puts after the prompt: the response and its end-of-turn token
    # when the sample stopped (mipo.encode_turn, the same cut the pointwise-MI meter uses).
    record = {"id": pair["id"]}
    for key in ("chosen", "rejected"):
        prompt_ids, response_ids = mipo.encode_turn(tokenizer, pair["prompt"], pair[key][0]["content"], pair.get(f"{key}_stopped", True))
        if not response_ids:
            raise MipoError(f"pair {pair['id']!r}: the {key} response is empty and was not stopped; it has no token to score")
        if len(prompt_ids) + len(response_ids) > context_window:
            raise MipoError(f"pair {pair['id']!r}: prompt + {key} response is {len(prompt_ids) + len(response_ids)} tokens, "
                            f"more than the model's context window of {context_window}")
        record["prompt_ids"], record[f"{key}_ids"], record[f"{key}_length"] = prompt_ids, response_ids, len(response_ids)
    if with_negative_prompt:  # infonce / sami also score both responses under x'
        if not pair.get("negative_prompt"):
            raise MipoError(f"pair {pair['id']!r} has no 'negative_prompt' (the prompt x' the negative was sampled from); "
                            "--loss infonce and sami need it: rebuild the pairs with mipo.py")
        for key in ("chosen", "rejected"):
            negative_prompt_ids, response_ids = mipo.encode_turn(tokenizer, pair["negative_prompt"], pair[key][0]["content"],
                                                                 pair.get(f"{key}_stopped", True))
            if response_ids != record[f"{key}_ids"]:
                raise MipoError(f"pair {pair['id']!r}: the chat template tokenizes the {key} response differently under x'; "
                                "--loss infonce and sami are not supported with this template")
        record["negative_prompt_ids"] = negative_prompt_ids
    return record


def collate(records: list[dict], with_negative_prompt: bool, device) -> dict:
    """One right-padded row per pair that holds the prompt once and both responses: [x, y+, x[-1], y-].

    y- follows a copy of x's last token, and the attention mask lets that copy and y- see x[:-1] and each other
    but neither y+ nor the original x[-1]; with their positions restarted where x ends, they compute exactly
    what a separate sequence x + y- would. So chosen and rejected are scored under x in one forward, and x is
    run once instead of twice (MIPO's prompts are longer than its responses: ~40% fewer tokens). infonce / sami
    add a second row per pair with x' in place of x. Masks are built from the lengths, never from a pad id.
    """
    prompts = [r["prompt_ids"] for r in records]
    if with_negative_prompt:
        prompts += [r["negative_prompt_ids"] for r in records]
        records = records + records
    T = max(len(p) + len(r["chosen_ids"]) + 1 + len(r["rejected_ids"]) for p, r in zip(prompts, records))
    R = len(prompts)
    input_ids = torch.zeros(R, T, dtype=torch.long)  # (R, T); any id pads: no real token attends to a pad
    positions = torch.zeros(R, T, dtype=torch.long)  # (R, T) RoPE positions
    branch = torch.zeros(R, T, dtype=torch.long)  # (R, T) 0: x[:-1] and pads, 1: x[-1] + y+, 2: x[-1] copy + y-
    chosen_mask = torch.zeros(R, T, dtype=torch.bool)  # (R, T) True on y+ tokens
    rejected_mask = torch.zeros(R, T, dtype=torch.bool)  # (R, T) True on y- tokens
    for i, (prompt, r) in enumerate(zip(prompts, records)):
        P, C, N = len(prompt), len(r["chosen_ids"]), len(r["rejected_ids"])
        input_ids[i, :P + C + 1 + N] = torch.tensor(prompt + r["chosen_ids"] + prompt[-1:] + r["rejected_ids"])
        positions[i, :P + C] = torch.arange(P + C)
        positions[i, P + C:P + C + 1 + N] = torch.arange(P - 1, P + N)
        branch[i, P - 1:P + C], branch[i, P + C:P + C + 1 + N] = 1, 2
        chosen_mask[i, P:P + C] = True
        rejected_mask[i, P + C + 1:P + C + 1 + N] = True
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    attention_mask = causal & ~((branch[:, :, None] == 2) & (branch[:, None, :] == 1))  # (R, T queries, T keys)
    return {
        "input_ids": input_ids.to(device), "positions": positions.to(device), "mask": attention_mask[:, None].to(device),
        "chosen_mask": chosen_mask.to(device), "rejected_mask": rejected_mask.to(device),
        # The logits at position t score token t+1, so none are needed before the shortest prompt's last token:
        # the output projection (a quarter of a small model's FLOPs at Qwen's 152k vocabulary) skips the prompts.
        "first": min(len(p) for p in prompts) - 1,
        "n_tokens": sum(len(p) + len(r["chosen_ids"]) + 1 + len(r["rejected_ids"]) for p, r in zip(prompts, records)),
    }


def forward_logps(model, batch: dict, hw: HardwareConfig):
    """Summed log pi(y+ | prompt) and log pi(y- | prompt) of every row: two (R,) float32 tensors."""
    first = batch["first"]
    with autocast(hw):
        logits = model(batch["input_ids"], batch["positions"], batch["mask"], logits_index=slice(first, None))  # (R, T - first, V)
    # Outside autocast on purpose: sequence_logps takes the log-softmax in float32.
    input_ids = batch["input_ids"][:, first:]
    chosen_logps, _ = sequence_logps(logits, input_ids, batch["chosen_mask"][:, first:])
    rejected_logps, _ = sequence_logps(logits, input_ids, batch["rejected_mask"][:, first:])
    return chosen_logps, rejected_logps


@torch.no_grad()
def reference_logps(model, tokenizer, pairs, loss: LossConfig, opt: OptimConfig, hw: HardwareConfig, out: Path,
                    rank: int, world: int, crash_at=None) -> list[dict]:
    path = out / "reference.jsonl"
    if path.exists():
        return read_jsonl(path)
    with_negative_prompt = loss.loss in ("infonce", "sami")
    records = [tokenize_pair(tokenizer, p, with_negative_prompt, model.config.max_position_embeddings) for p in pairs]
    # The micro-batches are those of the first epoch of training, on the rank that trains on them: step 0 then
    # runs the very computation that produced its reference numbers, and the step-0 check is exact even in bf16
    # (a row's rounding depends on the padded shape of its batch). Fixed batches also make the stage resumable.
    m, per_rank = opt.micro_batch_size, opt.batch_size // world
    order = epoch_order(len(records), opt.seed, 0)
    batches = [[records[i] for i in order[k:k + m]] for k in range(0, len(order), m)]
    mine = [b for k, b in enumerate(batches) if (k * m % opt.batch_size) // per_rank == rank] if not hw.shard else []
    if hw.shard:  # training's own split (shard.shard_batch), weight-0 padding dropped: under FSDP every rank runs
        G = opt.batch_size  # the same forwards, and only real pairs are written
        for k in range(0, len(order), G):
            share, weights = shard.shard_batch([records[i] for i in order[k:k + G]], rank, world)
            mine += [(share[j:j + m], weights[j:j + m]) for j in range(0, len(share), m)]
    partial = out / f"reference.rank{rank}-of-{world}.partial.jsonl"
    done = {r["id"]: r for r in read_jsonl(partial)}
    model.eval()
    for k, batch in enumerate(tqdm(mine, desc="reference log-probs", unit="batch", disable=rank != 0)):
        batch, weights = batch if hw.shard else (batch, [1.0] * len(batch))
        finished = all(r["id"] in done for r, w in zip(batch, weights) if w > 0)
        if shard.every_rank(finished, hw.device) if hw.shard else finished:
            continue
        chosen_logps, rejected_logps = forward_logps(model, collate(batch, with_negative_prompt, hw.device), hw)  # as in training
        lines = []
        for i, (r, w) in enumerate(zip(batch, weights)):  # rows [:B] are under x (B more under x' for infonce / sami)
            if w == 0:  # a padding copy (shard.shard_batch)
                continue
            r = {**r, "ref_chosen_logps": chosen_logps[i].item(), "ref_rejected_logps": rejected_logps[i].item()}
            done[r["id"]] = r
            lines.append(json.dumps(r) + "\n")
        with open(partial, "a", encoding="utf-8") as f:
            f.write("".join(lines))  # one write per micro-batch
            f.flush()
        crash_hook(crash_at, "reference", k + 1)
    barrier(world)
    if rank == 0:  # merge the ranks' files, in the pairs' order, into one file written atomically
        for r in range(1, world):
            done.update({x["id"]: x for x in read_jsonl(out / f"reference.rank{r}-of-{world}.partial.jsonl")})
        mipo.write_atomically(path, "".join(json.dumps(done[r["id"]]) + "\n" for r in records))
        for r in range(world):
            (out / f"reference.rank{r}-of-{world}.partial.jsonl").unlink(missing_ok=True)
    barrier(world)
    return read_jsonl(path)


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: DPO. Plain PyTorch: AdamW, cosine schedule with warmup, gradient accumulation over micro-batches,
# DistributedDataParallel across processes, an atomic checkpoint every --save-every steps.
# ---------------------------------------------------------------------------------------------------------------


def learning_rate(step: int, total_steps: int, cfg: OptimConfig) -> float:
    # The paper's schedule, cosine_with_min_lr, exactly as transformers' get_cosine_with_min_lr_schedule_with_warmup
    # computes it for its OpenRLHF code: a linear warmup from 0 over ceil(3%) of the steps (so with any warmup the
    # first step runs at lr 0 and moves no weight), then a cosine from lr down to min_lr_ratio * lr. A pure function
    # of the step: nothing else to checkpoint.
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.lr * (float(step) / float(max(1, warmup)))
    progress = float(step - warmup) / float(max(1, total_steps - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * max(0.0, factor * (1 - cfg.min_lr_ratio) + cfg.min_lr_ratio)


def epoch_order(n_pairs: int, seed: int, epoch: int) -> list[int]:
    # The data order depends only on (seed, epoch): a resumed run sees the pairs in the same order.
    return torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def rng_state() -> dict:
    """Every random generator's state as lists and numbers, which JSON and torch.load(weights_only=True) both read:
    a checkpoint holds no object whose loading runs code, so opening a run directory someone else made is safe."""
    numpy_state = np.random.get_state()  # ("MT19937", (624,) uint32 keys, position, has_gauss, cached_gaussian)
    version, python_internal, python_gauss = random.getstate()
    return {"torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
            "python": [version, list(python_internal), python_gauss],
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}


def set_rng_state(state: dict):
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    version, python_internal, python_gauss = state["python"]
    random.setstate((version, tuple(python_internal), python_gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def save_checkpoint(path: Path, model, optimizer, step: int):
    state = {
        "step": step,  # optimizer steps done: fixes the data position (epoch, batch) and the learning rate
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),  # tensors, numbers and tuples only
        "rng": rng_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a temporary name, then an atomic rename: a kill never leaves half a checkpoint
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer, sharded: bool = False) -> int:
    """Fills model and optimizer from the run's checkpoint (--shard: shard.load_sharded's directory, a collective),
    restores the RNG states and says so; -> the optimizer steps done, 0 when there is no checkpoint."""
    if sharded:
        extra = shard.load_sharded(path, model, optimizer)
        if extra is None:
            return 0
        step, rng = extra["step"], extra["rng"]
    else:
        if not path.exists():
            return 0
        try:  # weights_only: tensors, numbers and containers, never an arbitrary object
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MipoError(f"{path}: not a checkpoint this version of train.py wrote ({str(e).splitlines()[0][:200]}); "
                            "delete it to restart training from the stored pairs")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, rng = state["step"], state["rng"]
    set_rng_state(rng)
    if rank_zero():
        print(f"resuming from {path}: {step} optimizer step(s) done, training continues at step {step + 1}", flush=True)
    return step


def train(model, records: list[dict], loss: LossConfig, opt: OptimConfig, hw: HardwareConfig, out: Path,
          rank: int, world: int, crash_at=None):
    G = opt.batch_size
    per_rank = G // world  # pairs each process handles per step
    steps_per_epoch = len(records) // G  # the last partial batch of an epoch is dropped
    total_steps = steps_per_epoch * opt.epochs
    return_freed_memory_to_the_os()
    model.train()
    model.gradient_checkpointing = hw.gradient_checkpointing
    # Weights, gradients and AdamW moments stay float32 even with bf16 compute: an update of lr 5e-7 times a
    # unit Adam step is far below bf16's resolution (8 bits of mantissa) and would round away.
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay,
                                  eps=1e-8, fused=torch.device(hw.device).type in ("cpu", "cuda"))
    checkpoint_path, metrics_path = out / ("checkpoint" if hw.shard else "checkpoint.pt"), out / "metrics.jsonl"
    start = load_checkpoint(checkpoint_path, model, optimizer, hw.shard)  # --shard: a directory of per-rank shards
    saved = start  # the step of the last good checkpoint (0: none)
    if rank == 0:  # the metrics history of the run being resumed, without the steps that are done again
        mipo.write_atomically(metrics_path, "".join(json.dumps(x) + "\n" for x in read_jsonl(metrics_path) if x["step"] <= start))
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and not hw.shard else model
    with tqdm(total=total_steps, initial=start, desc="DPO", unit="step", disable=rank != 0) as bar:
        for step in range(start, total_steps):
            t0 = time.time()
            epoch, position = divmod(step, steps_per_epoch)
            batch = [records[i] for i in epoch_order(len(records), opt.seed, epoch)[position * G:(position + 1) * G]]
            lr = learning_rate(step, total_steps, opt)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if hw.shard:
                mine, weights = shard.shard_batch(batch, rank, world)
            else:
                mine, weights = batch[rank * per_rank:(rank + 1) * per_rank], None
            stats, n_tokens = accumulate_gradients(ddp_model, mine, loss, opt, hw, world, weights)
            if hw.shard:
                grad_norm = shard.clip_grad_norm(model, opt.grad_clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip).item()
            stats = gather(stats, world, hw.device)[:G]  # (G, k): every pair of the global batch, on every rank
            batch_loss = stats[:, STAT_COLUMNS.index("loss")].mean().item()
            if not (math.isfinite(batch_loss) and math.isfinite(grad_norm)):
                # Every rank sees the same gathered numbers, so every rank stops here, before the update.
                last_good = f"{checkpoint_path} (step {saved})" if saved else "none yet"
                raise MipoError(f"step {step + 1}: the loss is {batch_loss} and the gradient norm {grad_norm}; training "
                                f"stopped before the update. Last good checkpoint: {last_good}. Lower --lr or check the pairs")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            metrics = step_metrics(stats, step, lr, grad_norm, n_tokens * world, time.time() - t0, steps_per_epoch)
            if step == 0:
                metrics.update(step0_check(stats))
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
                bar.update(1)
                if step == 0:
                    bar.write(step0_message(metrics, loss))
            if (step + 1) % hw.save_every == 0 and step + 1 < total_steps:
                if hw.shard:  # collective: every rank writes its shards
                    shard.save_sharded(checkpoint_path, model, optimizer, {"step": step + 1, "rng": rng_state()})
                elif rank == 0:
                    save_checkpoint(checkpoint_path, model, optimizer, step + 1)
                saved = step + 1
                barrier(world)
            crash_hook(crash_at, "train", step + 1)


def accumulate_gradients(ddp_model, mine: list[dict], loss: LossConfig, opt: OptimConfig, hw: HardwareConfig, world: int,
                         weights: list[float] | None = None):
    """Forward and backward over this process's share of the global batch, one micro-batch at a time.
    Returns the per-pair numbers to log, (share, k), and the tokens processed."""
    with_negative_prompt = loss.loss in ("infonce", "sami")
    m, stats, n_tokens = opt.micro_batch_size, [], 0
    for start in range(0, len(mine), m):
        micro = mine[start:start + m]
        # DDP all-reduces gradients in backward; only the last micro-batch of the step needs it.
        sync = world == 1 or start + m >= len(mine) or hw.shard  # FSDP: reduce-scatter every micro-batch
        with contextlib.nullcontext() if sync else ddp_model.no_sync():
            batch = collate(micro, with_negative_prompt, hw.device)
            chosen_logps, rejected_logps = forward_logps(ddp_model, batch, hw)  # (R,) each
            losses, micro_stats = dpo_terms(chosen_logps, rejected_logps, micro, loss)  # (B,), (B, k)
            # Summed over the micro-batch, divided by the pairs of this process: the accumulated gradient is the
            # mean over the global batch however it is split (and DDP averages the processes' equal shares).
            if weights is None:
                (losses.sum() / len(mine)).backward()
            else:  # shard.shard_batch's weights: world / G per real pair, 0 per padding copy
                (losses * torch.tensor(weights[start:start + m], device=losses.device)).sum().backward()
        stats.append(micro_stats)
        n_tokens += batch["n_tokens"]
    return torch.cat(stats), n_tokens


# The per-pair numbers one step logs, as columns of a (B, k) tensor so that processes can gather them.
STAT_COLUMNS = ("loss", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps", "chosen_lengths",
                "rejected_lengths", "abs_logp_diff")


def dpo_terms(chosen_logps, rejected_logps, micro: list[dict], loss: LossConfig):
    """The policy's log-probs and the stored reference ones -> per-pair losses (DPO Eq. 7 for MIPO's sigmoid) and
    the per-pair numbers to log."""
    B = len(micro)
    chosen, rejected = chosen_logps[:B], rejected_logps[:B]  # (B,) log pi(y+|x), log pi(y-|x)
    ref_chosen = torch.tensor([r["ref_chosen_logps"] for r in micro], device=chosen.device)  # (B,) float32
    ref_rejected = torch.tensor([r["ref_rejected_logps"] for r in micro], device=chosen.device)
    chosen_lengths = torch.tensor([r["chosen_length"] for r in micro], device=chosen.device)
    rejected_lengths = torch.tensor([r["rejected_length"] for r in micro], device=chosen.device)
    options = loss.options()
    if len(chosen_logps) == 2 * B:  # infonce / sami: rows B: are the same pairs under x'
        under_x = torch.stack([chosen, rejected], dim=1)  # (B, 2 responses)
        under_x_prime = torch.stack([chosen_logps[B:], rejected_logps[B:]], dim=1)  # (B, 2 responses)
        options["logps_matrix"] = torch.stack([under_x, under_x_prime], dim=1)  # (B, prompt x|x', response y+|y-)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        loss.loss, chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, beta=loss.beta, **options)
    abs_diff = torch.maximum((chosen - ref_chosen).abs(), (rejected - ref_rejected).abs())  # the step-0 check
    stats = torch.stack([losses.detach(), chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach(),
                         chosen_lengths.float(), rejected_lengths.float(), abs_diff.detach()], dim=1)  # (B, k)
    return losses, stats.float().cpu()


def gather(stats, world: int, device):
    if world == 1:
        return stats
    stats = stats.to(device)  # nccl gathers GPU tensors only
    parts = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(parts, stats)
    return torch.cat(parts).cpu()


def step_metrics(stats, step, lr, grad_norm, n_tokens, seconds, steps_per_epoch) -> dict:
    col = {name: stats[:, i] for i, name in enumerate(STAT_COLUMNS)}
    return {
        "step": step + 1,
        "epoch": (step + 1) / steps_per_epoch,
        "loss": col["loss"].mean().item(),
        **preference_metrics(col["chosen_rewards"], col["rejected_rewards"], col["chosen_logps"], col["rejected_logps"],
                             col["chosen_lengths"], col["rejected_lengths"]),
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens/s": n_tokens / seconds,
        "pairs/s": len(stats) / seconds,
    }


def step0_check(stats) -> dict:
    # Before the first update the policy IS the reference, so every log-ratio is 0, every reward is 0 and the
    # sigmoid loss is -log sigma(0) = ln 2. Step 0 repeats the reference pass's computation on the same
    # micro-batches, so the numbers agree exactly; the tolerance only absorbs nondeterministic GPU kernels.
    # A mismatch means the reference pass and training scored different tokens or ran different numerics.
    diff = stats[:, STAT_COLUMNS.index("abs_logp_diff")].max().item()
    return {"step0/max_abs_logp_diff": diff, "step0/tolerance": STEP0_TOLERANCE, "step0/ok": diff <= STEP0_TOLERANCE}


def step0_message(first: dict, loss: LossConfig) -> str:
    """first: the metrics of step 1, whose loss was computed before the first update."""
    message = f"step-0 check: max |log pi - log pi_ref| = {first['step0/max_abs_logp_diff']:.2e} nats"
    if loss.loss == "sigmoid" and not loss.reference_free and loss.label_smoothing == 0:
        message += f", rewards {first['rewards/chosen']:.1e} / {first['rewards/rejected']:.1e}, loss {first['loss']:.6f} (ln 2 = {LN2:.6f})"
    if first["step0/ok"]:
        return message + ": OK"
    return message + f": MISMATCH (tolerance {first['step0/tolerance']:.2e}); the stored reference log-probs are not this model's"


# ---------------------------------------------------------------------------------------------------------------
# Stage 4: the final model, in Hugging Face layout, then the held-out meter of the trained model.
# ---------------------------------------------------------------------------------------------------------------


def save_final(model, tokenizer, out: Path) -> Path:
    final = save_model(model, tokenizer, out / "final")  # written under a temporary name, then renamed
    # The last checkpoint (a full copy of the weights and twice that for AdamW) is no longer needed.
    (out / "checkpoint.pt").unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # --shard's: a directory of per-rank shards
    return final


@torch.no_grad()
def held_out_meter(reference, tokenizer, task, examples, eval_pairs, batch_size: int = 8) -> dict:
    """On held-out pairs whose chosen response is the measured model's own sample from x: the mean pointwise mutual
    information log p(y|x) - log p(y|x') under the reference (base) model, what MIPO claims to raise (mipo.mi_meter),
    the responses' length and truncation, and the task's metric of those samples."""
    was_training = reference.training
    reference.eval()
    meter = mipo.mi_meter(reference, tokenizer, meter_rows(eval_pairs), batch_size)
    by_id = {ex.id: ex for ex in examples}
    scores: dict[str, list[float]] = {}
    for pair in eval_pairs:
        for metric, value in task.score(by_id[pair["id"]], pair["chosen"][0]["content"]).items():
            scores.setdefault(metric, []).append(value)
    reference.train(was_training)
    return {**meter, "task": {metric: sum(v) / len(v) for metric, v in scores.items()}}


def meter_rows(eval_pairs: list[dict]) -> list[tuple]:
    """(x, x', y, stopped) of each held-out pair, y its chosen response."""
    return [(p["prompt"], p["negative_prompt"], p["chosen"][0]["content"], p.get("chosen_stopped", True)) for p in eval_pairs]


def with_own_samples(model, tokenizer, eval_pairs, cfg: PairsConfig) -> list[dict]:
    """The held-out pairs with the chosen response resampled from the (trained) model, same settings and seed."""
    import sampler

    s = cfg.sampling
    prompts = [tokenizer.apply_chat_template(p["prompt"]) for p in eval_pairs]
    completions = sampler.generate(model, prompts, s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                   top_k=s.top_k, stop_token_ids=tokenizer.stop_token_ids, seed=cfg.seed,
                                   batch_size=2 * cfg.sample_batch_size, progress=False)
    resampled = []
    for pair, tokens in zip(eval_pairs, completions):
        text, stopped = mipo.response_text(tokenizer, tokens)
        resampled.append({**pair, "chosen": [{"role": "assistant", "content": text}], "chosen_stopped": stopped})
    return resampled


def trained_meter(cfg: PairsConfig, hw: HardwareConfig, final_dir: Path, eval_pairs: list[dict], eval_path: Path) -> dict:
    """The trained model samples its own responses to the held-out prompts; the base model scores them (the meter
    MIPO's claim is about), and the trained model too (pmi_self, for comparison only)."""
    task = mipo.get_task(cfg.task)
    eval_examples = mipo.load_examples(task, "eval", cfg.n_eval, cfg.data, cfg.eval_data)
    dtype = torch.bfloat16 if hw.dtype == "bfloat16" else torch.float32  # the dtype the base model was measured in
    policy, tokenizer = load_model(final_dir, hw.device, dtype)
    mipo.use_recorded_date(tokenizer, eval_pairs, eval_path)
    own = with_own_samples(policy, tokenizer, eval_pairs, cfg)
    pmi_self = mipo.mi_meter(policy, tokenizer, meter_rows(own))["pmi"]
    del policy
    reference, tokenizer = load_model(cfg.model, hw.device, dtype)
    mipo.use_recorded_date(tokenizer, eval_pairs, eval_path)
    return {**held_out_meter(reference, tokenizer, task, eval_examples, own), "pmi_self": pmi_self}


# ---------------------------------------------------------------------------------------------------------------
# The command line. Flags default to None so that the preset fills in whatever was not given.
# ---------------------------------------------------------------------------------------------------------------


def flag_error(message):
    raise MipoError(f"bad flag: {message}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="MIPO: sample pairs from the base model, score them under it, "
                                                 "train one epoch of DPO, save a Hugging Face model.")
    parser.error = flag_error  # argparse would print its usage block; one line instead, and exit status 2
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="qwen", help="bundled model (qwen, llama, smollm2), a Hugging Face directory, or a "
                   "hub name such as Qwen/Qwen2.5-1.5B-Instruct, downloaded once with huggingface_hub (default qwen)")
    g.add_argument("--revision", default=None, help="with a hub name: the commit (or branch, tag) to download (default main)")
    g.add_argument("--preset", choices=PRESETS, default=None, help="cpu: a ~5 minute run on 2 CPU cores; paper: the "
                   "paper's settings (default: cpu on a CPU, paper on a GPU)")
    g = parser.add_argument_group("data / pairs (stage 1)")
    g.add_argument("--task", default="persona", help=f"one of {', '.join(mipo.TASKS)} (default persona)")
    g.add_argument("--data", default=None, help="--task jsonl: the prompts file (every fifth item is held out)")
    g.add_argument("--eval-data", default=None, help="--task jsonl: a separate file of held-out prompts (then all of --data trains)")
    g.add_argument("--negative", choices=mipo.NEGATIVES, default=None, help="random: the response sampled for another "
                   "prompt (one sampling pass, the paper's); incomplete: sampled from x without its user context or with a "
                   "sentence dropped; random-resample: sampled again from another prompt, or from x under another user's "
                   "context (default: the task's)")
    g.add_argument("--n", type=int, default=None, help="training prompts, hence pairs (preset: cpu 64, paper all; 0: all)")
    g.add_argument("--n-eval", type=int, default=None, help="held-out prompts for the pointwise-MI meter and the task metric (0: none)")
    g.add_argument("--pairs", default=None, help="train on this pairs file (mipo.py's format) instead of sampling")
    g = parser.add_argument_group("sampling (stage 1; defaults: the task's, shortened on a CPU)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per response")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=None, help="top-k filter (0: off)")
    g.add_argument("--sample-batch-size", type=int, default=16, help="prompts per generate call (default 16)")
    g.add_argument("--drop-truncated", action="store_true", help="train only on pairs whose two responses both ended "
                   "before --max-new-tokens (default: keep every pair, as the paper)")
    g = parser.add_argument_group("loss (stage 3)")
    g.add_argument("--loss", choices=LOSS_TYPES, default="sigmoid", help="preference loss (default sigmoid: DPO, as MIPO)")
    g.add_argument("--beta", type=float, default=0.1, help="DPO's beta, the strength of the pull to the reference (default 0.1)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="cDPO / robust / EXO: label-flip probability")
    g.add_argument("--reference-free", action="store_true", help="drop pi_ref from the loss")
    g.add_argument("--rpo-alpha", type=float, default=None, help="RPO: add alpha x the chosen response's NLL")
    g.add_argument("--f-divergence-type", choices=F_DIVERGENCES, default="reverse_kl", help="f-DPO divergence")
    g.add_argument("--f-alpha-divergence-coef", type=float, default=0.5, help="f-DPO alpha (alpha_divergence)")
    g.add_argument("--discopop-tau", type=float, default=0.05, help="DiscoPOP temperature")
    g.add_argument("--simpo-gamma", type=float, default=0.5, help="SimPO target margin")
    g.add_argument("--bco-delta", type=float, default=None, help="BCO reward shift (default: the batch mean)")
    g.add_argument("--loss-temperature", type=float, default=1.0, help="infonce / sami: log-probs are divided by it")
    g = parser.add_argument_group("optimization (stage 3)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (preset: cpu 2e-6, paper 5e-7)")
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps with linear warmup (default 0.03)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine ends at this fraction of --lr (default 0.1)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (default 1.0)")
    g.add_argument("--epochs", type=int, default=1, help="passes over the pairs (default 1, as the paper)")
    g.add_argument("--batch-size", type=int, default=None, help="global batch: pairs per optimizer step (default 4)")
    g.add_argument("--micro-batch-size", type=int, default=None, help="pairs per forward on each process (default 4); the update does not depend on it")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling and of the data order (default 0)")
    g = parser.add_argument_group("run / checkpoint")
    g.add_argument("--out", default=None, help="run directory (default runs/MODEL-TASK-NEGATIVE-LOSS); the model goes to OUT/final")
    g.add_argument("--save-every", type=int, default=None, help="optimizer steps between checkpoints (preset: cpu 8, paper 100)")
    g.add_argument("--_crash-at", default=None, help=argparse.SUPPRESS)  # test hook, see crash_hook
    g = parser.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="compute dtype; bfloat16 "
                   "runs matmuls in bf16 under autocast, weights and AdamW stay float32 (default auto: bfloat16 on a "
                   "GPU or a CPU with bf16 instructions, else float32)")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None, help="recompute each layer in backward: "
                   "less memory, ~30%% more time (--preset paper on a GPU turns it on when the model needs it)")
    g.add_argument("--shard", action="store_true", help="FSDP2: shard weights, gradients and AdamW states over the torchrun "
                   "processes (bf16 compute over float32 master weights with --dtype bfloat16); docs/scaling.md")
    return parser.parse_args(argv)


def resolve_config(args):
    """Flags and the preset -> the four configs, each value from exactly one place, with every check up front."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset or ("cpu" if torch.device(device).type == "cpu" else "paper")]
    task = mipo.get_task(args.task)
    for flag, value, low in (("--n", args.n, 0), ("--n-eval", args.n_eval, 0), ("--batch-size", args.batch_size, 1),
                             ("--micro-batch-size", args.micro_batch_size, 1), ("--epochs", args.epochs, 1),
                             ("--save-every", args.save_every, 1), ("--sample-batch-size", args.sample_batch_size, 1)):
        if value is not None and value < low:
            raise MipoError(f"{flag} {value}: must be at least {low}")
    if args.lr is not None and not args.lr > 0:
        raise MipoError(f"--lr {args.lr}: must be > 0")
    if not args.beta > 0:
        raise MipoError(f"--beta {args.beta}: must be > 0 (MIPO uses 0.1)")
    base = task.cpu if preset["sampling"] == "cpu" else task.paper
    given = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    sampling = replace(base, **{k: v for k, v in given.items() if v is not None})
    if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0 or sampling.max_new_tokens < 1:
        raise MipoError(f"sampling {asdict(sampling)}: need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0, --max-new-tokens >= 1")
    n = preset["n"] if args.n is None else (args.n or None)
    model = local_model(args.model, args.revision)  # a hub name: downloaded now, then a local directory like any other
    pairs = PairsConfig(model=model, task=args.task, data=args.data, eval_data=args.eval_data,
                        negative=args.negative or task.negative, n=n,
                        n_eval=preset["n_eval"] if args.n_eval is None else args.n_eval, pairs_file=args.pairs,
                        sampling=sampling, sample_batch_size=args.sample_batch_size, seed=args.seed,
                        drop_truncated=args.drop_truncated)
    loss = LossConfig(loss=args.loss, beta=args.beta, label_smoothing=args.label_smoothing, reference_free=args.reference_free,
                      rpo_alpha=args.rpo_alpha, f_divergence_type=args.f_divergence_type,
                      f_alpha_divergence_coef=args.f_alpha_divergence_coef, discopop_tau=args.discopop_tau,
                      simpo_gamma=args.simpo_gamma, bco_delta=args.bco_delta, temperature=args.loss_temperature)
    try:
        check_options(loss.loss, loss.beta, loss.options())
    except ValueError as e:
        raise MipoError(f"--loss {loss.loss}: {e}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch_size = args.batch_size or preset["batch_size"]
    # By default each process runs its whole share of the global batch in one forward, up to the preset's micro-batch.
    micro_batch_size = args.micro_batch_size or min(preset["micro_batch_size"], math.ceil(batch_size / world))
    opt = OptimConfig(lr=args.lr or preset["lr"], weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                      min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip, epochs=args.epochs,
                      batch_size=batch_size, micro_batch_size=micro_batch_size, seed=args.seed)
    dtype = args.dtype
    if dtype == "auto":
        if torch.device(device).type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        else:
            dtype = "bfloat16" if cpu_has_fast_bf16() else "float32"
    hw = HardwareConfig(device=device, dtype=dtype, gradient_checkpointing=bool(args.gradient_checkpointing),
                        shard=args.shard, save_every=args.save_every or preset["save_every"])
    if preset is PRESETS["paper"] and torch.device(device).type == "cuda" and args.micro_batch_size is None \
            and args.gradient_checkpointing is None:
        gpu_bytes = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
        opt, hw = fit_to_gpu(pairs.model, sampling.max_new_tokens, opt, hw, world, gpu_bytes)
    if args.shard:  # shard.shard_batch: ceil(G / world) pairs per rank, padded with weight-0 copies
        slots = math.ceil(opt.batch_size / world)
        if slots % opt.micro_batch_size:
            raise MipoError(f"--micro-batch-size {opt.micro_batch_size} must divide the {slots} pair(s) each of {world} "
                            f"process(es) gets of --batch-size {opt.batch_size}")
    elif opt.batch_size % (world * opt.micro_batch_size):
        raise MipoError(f"--batch-size {opt.batch_size} must be a multiple of --micro-batch-size {opt.micro_batch_size} "
                        f"x {world} process(es)")
    if loss.loss in BATCH_COUPLED_LOSSES and opt.micro_batch_size != opt.batch_size and rank_zero():
        print(f"note: --loss {loss.loss} compares the pairs of one forward with each other; with micro-batches "
              "smaller than --batch-size it sees only the micro-batch", file=sys.stderr)
    negative = pairs.negative
    out = Path(args.out or f"runs/{Path(args.model).name}-{args.task}-{negative}-{args.loss}")
    return pairs, loss, opt, hw, out


def fit_to_gpu(model: str, response_tokens: int, opt: OptimConfig, hw: HardwareConfig, world: int, gpu_bytes: float):
    """--preset paper on a GPU with --micro-batch-size and --gradient-checkpointing left out: the largest micro-batch
    (fewest accumulation steps) whose memory plan fits, first without gradient checkpointing, which is faster
    (shard.choose_layout, from config.json). The global batch stays --batch-size. -> (opt, hw) updated."""
    cfg = ModelConfig.from_dict(read_json(resolve_model_dir(model) / "config.json"))
    strategy = "fsdp" if hw.shard else ("ddp" if world > 1 else "single")
    layout = shard.choose_layout(cfg, world, strategy, gpu_bytes, opt.batch_size, response_tokens=response_tokens,
                                 param_bytes=2 if hw.dtype == "bfloat16" else 4)
    return (replace(opt, micro_batch_size=layout["micro_batch_pairs"]),
            replace(hw, gradient_checkpointing=layout["gradient_checkpointing"]))


def rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_run_dir(out: Path, settings: dict):
    """config.json holds the settings of the run in this directory; a different result-changing setting means
    another run, and mixing two runs' files would silently train on the wrong data."""
    path = out / "config.json"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        mipo.write_atomically(path, json.dumps(settings, indent=2) + "\n")
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise MipoError(f"{path}: not valid JSON; delete the run directory or pass another --out")
    for section, values in settings.items():
        for key, value in values.items():
            if f"{section}.{key}" in MAY_CHANGE:
                continue
            before = old.get(section, {}).get(key, "(not set)")
            if json.loads(json.dumps(value)) != before:
                raise MipoError(f"{path}: this run directory holds a run with {section}.{key} = {before!r}, this command "
                                f"asks for {value!r}; pass another --out, or the same settings to resume it")


def main(argv=None):
    args = parse_args(argv)
    pairs_cfg, loss_cfg, opt_cfg, hw, out = resolve_config(args)
    rank, world, hw.device = init_distributed(hw.device)
    if rank == 0:
        check_run_dir(out, {"pairs": asdict(pairs_cfg), "loss": asdict(loss_cfg), "optim": asdict(opt_cfg), "hardware": asdict(hw)})
    barrier(world)
    torch.manual_seed(opt_cfg.seed)
    if rank == 0:
        print_plan(pairs_cfg, loss_cfg, opt_cfg, hw, out, world)
    timings = {}

    t = time.time()
    pairs, eval_pairs, base_eval = make_pairs(pairs_cfg, hw, out, rank, world)
    timings["pairs"] = time.time() - t
    pair_stats = mipo.pair_stats(pairs)
    if pairs_cfg.drop_truncated:  # a cut response has no end-of-turn token: such a pair also teaches "stop" or "go on"
        pairs = [p for p in pairs if p.get("chosen_stopped", True) and p.get("rejected_stopped", True)]
    pair_stats["trained_on"] = len(pairs)
    if rank == 0:
        print(pairs_message(pair_stats, pairs_cfg), flush=True)
    final_dir = out / "final"
    if not final_dir.exists():
        model, tokenizer = load_model(pairs_cfg.model, hw.device, torch.float32)
        mipo.use_recorded_date(tokenizer, pairs, pairs_cfg.pairs_file or out / "pairs.jsonl")
        if hw.shard:  # before the reference pass: it must run the very computation of training's step 0
            shard.shard_model(model, param_dtype=torch.bfloat16 if hw.dtype == "bfloat16" else None)
        t = time.time()
        records = reference_logps(model, tokenizer, pairs, loss_cfg, opt_cfg, hw, out, rank, world, args._crash_at)
        timings["reference"] = time.time() - t
        if len(records) < opt_cfg.batch_size:
            raise MipoError(f"{len(records)} pairs are fewer than one batch of --batch-size {opt_cfg.batch_size}; raise --n")
        t = time.time()
        train(model, records, loss_cfg, opt_cfg, hw, out, rank, world, args._crash_at)
        timings["train"] = time.time() - t
        final_model = shard.full_model_on_rank0(model) if hw.shard else model  # collective: every rank calls it
        if rank == 0:
            save_final(final_model, tokenizer, out)
        del model
        barrier(world)
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return

    summary_path = out / "summary.json"
    if not summary_path.exists():
        history = read_jsonl(out / "metrics.jsonl")
        summary = {"final": str(final_dir), "pairs": pair_stats, "step0": history[0], "last": history[-1],
                   "base_eval": base_eval, "trained_eval": None, "timings_s": timings}
        if eval_pairs:
            t = time.time()
            summary["trained_eval"] = trained_meter(pairs_cfg, hw, final_dir, eval_pairs, out / "eval_pairs.jsonl")
            timings["held_out_eval"] = time.time() - t
        mipo.write_atomically(summary_path, json.dumps(summary, indent=2))
    print_summary(json.loads(summary_path.read_text()), loss_cfg)


def print_plan(pairs_cfg: PairsConfig, loss_cfg: LossConfig, opt_cfg: OptimConfig, hw: HardwareConfig, out: Path, world: int):
    s = pairs_cfg.sampling
    source = pairs_cfg.pairs_file or f"{pairs_cfg.n or 'all'} {pairs_cfg.task} prompts"
    known_n = pairs_cfg.n and not pairs_cfg.pairs_file  # a given pairs file may hold fewer pairs than --n
    steps = f"{pairs_cfg.n // opt_cfg.batch_size * opt_cfg.epochs} steps" if known_n else f"{opt_cfg.epochs} epoch(s)"
    steps = f"up to {steps}" if known_n and pairs_cfg.drop_truncated else steps
    cut = "dropped (--drop-truncated)" if pairs_cfg.drop_truncated else "kept, as the paper"
    print(f"MIPO run in {out}: {world} process(es) on {hw.device}, {hw.dtype} compute, float32 weights and AdamW\n"
          f"  1 pairs      {source} (+{pairs_cfg.n_eval} held out), --negative {pairs_cfg.negative}; {pairs_cfg.model} "
          f"samples at T={s.temperature}, top-p {s.top_p}, up to {s.max_new_tokens} new tokens; pairs with a response "
          f"cut at that limit: {cut}\n"
          f"  2 reference  one no-grad pass of the base model over every pair, stored; no reference model after it\n"
          f"  3 DPO        --loss {loss_cfg.loss}, beta {loss_cfg.beta}: {steps} of {opt_cfg.batch_size} pairs (micro-batch "
          f"{opt_cfg.micro_batch_size}), AdamW lr {opt_cfg.lr:g} cosine to {opt_cfg.min_lr_ratio:g}x, checkpoint every "
          f"{hw.save_every} steps\n"
          f"  4 final      {out / 'final'}", flush=True)
    # Whether stage 3 fits, before anything runs (shard.memory_plan: an estimate from config.json, about +-20%).
    cfg = ModelConfig.from_dict(read_json(resolve_model_dir(pairs_cfg.model) / "config.json"))
    strategy = "fsdp" if hw.shard else ("ddp" if world > 1 else "single")
    plan = shard.memory_plan(cfg, world, strategy, hw.gradient_checkpointing, opt_cfg.micro_batch_size,
                             response_tokens=s.max_new_tokens, param_bytes=2 if hw.dtype == "bfloat16" else 4)
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if torch.device(hw.device).type == "cuda" else None
    print(shard.format_memory_plan(plan, gpu_bytes), flush=True)


def pairs_message(stats: dict, cfg: PairsConfig) -> str:
    kept = (f"--drop-truncated: training on the {stats['trained_on']} pairs with both sides complete" if cfg.drop_truncated
            else "all kept (--drop-truncated drops them)")
    return (f"pairs: {stats['pairs']}; cut at {cfg.sampling.max_new_tokens} new tokens: chosen {stats['chosen_truncated']:.0%}, "
            f"rejected {stats['rejected_truncated']:.0%}, a pair with either side cut {stats['either_truncated']:.0%}: {kept}")


def print_summary(summary: dict, loss_cfg: LossConfig):
    print(f"\ntrained model: {summary['final']}  (model_loader.load_model, or transformers' from_pretrained)")
    print(step0_message(summary["step0"], loss_cfg))
    last = summary["last"]
    print(f"last step ({last['step']}): loss {last['loss']:.4f}, reward accuracy {last['rewards/accuracies']:.2f}, "
          f"margin {last['rewards/margins']:.4f}")
    before, after = summary["base_eval"], summary["trained_eval"]
    if before and after:
        print(f"held-out pointwise MI under the base model, log p_base(y|x) - log p_base(y|x') with y each model's own "
              f"sample from x, over {before['pairs']} prompts: {before['pmi']:.3f} -> {after['pmi']:.3f} nats "
              f"(scored by the trained model itself: {after['pmi_self']:.3f})")
        print(f"held-out responses: {before['length']:.1f} -> {after['length']:.1f} tokens, cut at the limit "
              f"{before['truncated']:.0%} -> {after['truncated']:.0%}")
        for metric, value in before["task"].items():
            if not metric.startswith("met_"):  # persona's per-preference rates stay in summary.json
                print(f"held-out {metric}: {value:.3f} -> {after['task'].get(metric, float('nan')):.3f}")
    print("time: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in summary["timings_s"].items()))


if __name__ == "__main__":
    try:
        main()
    except MipoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
