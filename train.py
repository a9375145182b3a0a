"""MIPO training, the command a user runs (Nam, Li, Jaques 2026, section 3): the base model samples its own
preference pairs, they are scored once under the frozen base model, then one epoch of DPO on them, and the
result is saved as a Hugging Face model. It orders the stages and holds no method of its own: the pairs are
mipo.py's, the loss dpo_loss.py's; beyond the held-out MI meter it measures nothing (the paper's tables are eval.py's).

    python train.py --model qwen                      # CPU preset: a small persona run, minutes on 2 CPU cores
                                                       # (README: set-up)
    python train.py --model qwen --preset paper       # the paper's settings, for a GPU
    torchrun --nproc_per_node 2 train.py -- --model qwen --n 64   # DDP: gloo on CPU, nccl on GPU (the -- keeps
                                                                   # torchrun from reading --n as its --nnodes)

Every stage writes a file in the run directory (--out) and is skipped when that file is complete, so the same
command, run again after a kill, resumes where the last run stopped:
    config.json       the settings; a rerun with incompatible settings is refused
    pairs.jsonl       stage 1, mipo.build_pairs: TRL's conversational preference format (+ x', the sampling)
    eval_pairs.jsonl  stage 1, the same for held-out prompts; base_eval.json: the base model's meter on them
    reference.jsonl   stage 2, one line per pair: token ids, lengths, ref_chosen_logps, ref_rejected_logps
    checkpoint.pt     stage 3, every --save-minutes and on Ctrl-C: model, AdamW, step (data position, lr), RNG states
    metrics.jsonl     stage 3, one line per optimizer step, under TRL's metric names
    final/            stage 4, the trained model: config.json, model.safetensors, tokenizer files, chat template
    summary.json      the step-0 check, the last step's metrics, the held-out meter before and after

Shape legend: B pairs in a micro-batch, R rows in its forward (B: one row holds a prompt and both responses;
2B for infonce and sami, which also score both responses under x'), T padded tokens, V vocabulary.
"""
import contextlib
import gc
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from plumbing import config
import mipo
from plumbing import report
from plumbing import runs
import sampler
from plumbing import shard
from plumbing.config import HardwareConfig, LossConfig, OptimConfig, PairsConfig
from dpo_loss import preference_loss, preference_metrics, token_logps
from plumbing.files import Interrupted, MipoError, read_jsonl, run_command, write_atomically
from model_loader import load_model, save_model
from plumbing.runs import barrier, crash_hook
from tasks import get_task, load_examples

LN2 = math.log(2)
STEP0_TOLERANCE = 1e-3  # nats, on summed log-probs: see step0_check


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: pairs. For each prompt x the base model samples y+ from x and y- from x' (another prompt, or x
# without its context); both are stored under x (MIPO section 3). mipo.build_pairs does the work and resumes.
# ---------------------------------------------------------------------------------------------------------------


def make_pairs(cfg: PairsConfig, hw: HardwareConfig, out: Path, rank: int, world: int, crash_at=None):
    """-> (training pairs, held-out pairs, the base model's held-out meter or None)."""
    task = get_task(cfg.task)
    pairs_path, eval_path, base_eval_path = out / "pairs.jsonl", out / "eval_pairs.jsonl", out / "base_eval.json"
    # The settings the pairs are recorded with: what the flags left to the model (top-k, the penalty) taken from it.
    settings = mipo.sampling_settings(config.resolve_sampling(cfg.sampling, cfg.model), cfg.seed, cfg.model)
    if cfg.pairs_file:
        train_examples, pairs = None, runs.read_pairs_file(Path(cfg.pairs_file), cfg)
    else:
        train_examples = load_examples(task, "train", cfg.n, cfg.data, cfg.eval_data)
        pairs = mipo.read_complete_pairs(pairs_path, task, train_examples, cfg.negative, settings)
    eval_examples = load_examples(task, "eval", cfg.n_eval, cfg.data, cfg.eval_data) if cfg.n_eval > 0 else []
    eval_pairs = mipo.read_complete_pairs(eval_path, task, eval_examples, cfg.negative, settings) if eval_examples else []
    base_eval = json.loads(base_eval_path.read_text()) if base_eval_path.exists() else None
    if pairs is not None and eval_pairs is not None and (base_eval is not None or not eval_examples):
        return pairs, eval_pairs, base_eval

    # Sampling runs with the weights in the compute dtype: the sampler's KV cache holds the weights' dtype, and
    # bf16 matmuls are several times faster on a GPU and on CPUs with AMX (config.compute_dtype measures a CPU).
    dtype = torch.bfloat16 if hw.dtype == "bfloat16" else torch.float32
    model, tokenizer = load_model(cfg.model, hw.device, dtype)
    if pairs is None:
        pairs = build_sharded(model, tokenizer, task, train_examples, pairs_path, cfg, rank, world, crash_at)
    if eval_pairs is None:
        eval_pairs = build_sharded(model, tokenizer, task, eval_examples, eval_path, cfg, rank, world)
    if eval_pairs and rank == 0 and base_eval is None:
        # The held-out pairs' chosen responses are the base model's own samples from x: the meter before training.
        mipo.use_recorded_date(tokenizer, eval_pairs, eval_path)
        base_eval = held_out_meter(model, tokenizer, task, eval_examples, eval_pairs)
        base_eval["pmi_self"] = base_eval["pmi"]  # the base model's own samples, scored by itself
        write_atomically(base_eval_path, json.dumps(base_eval, indent=2))
    barrier(world)
    base_eval = json.loads(base_eval_path.read_text()) if base_eval_path.exists() else None
    del model
    return pairs, eval_pairs, base_eval


def build_sharded(model, tokenizer, task, examples, path: Path, cfg: PairsConfig, rank, world, crash_at=None) -> list[dict]:
    if world == 1:
        return mipo.build_pairs(model, tokenizer, task, examples, path, cfg.negative, cfg.sampling, cfg.seed,
                                cfg.sample_batch_size, cfg.model, after_batch=lambda k: crash_hook(crash_at, "pairs", k))
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
    # The positions whose logits score a response token (position t scores token t + 1): y+ from x's last token
    # on, y- from the copy of x[-1] on. Only these go through the output projection (152k x 896 for Qwen: a
    # quarter of its FLOPs per token) and the log-softmax, not the prompts and not the padding.
    rows, cols, segment = [], [], []  # (N,) each: row, position, and 2 * row + (0 for y+, 1 for y-)
    for i, (prompt, r) in enumerate(zip(prompts, records)):
        P, C, N = len(prompt), len(r["chosen_ids"]), len(r["rejected_ids"])
        input_ids[i, :P + C + 1 + N] = torch.tensor(prompt + r["chosen_ids"] + prompt[-1:] + r["rejected_ids"])
        positions[i, :P + C] = torch.arange(P + C)
        positions[i, P + C:P + C + 1 + N] = torch.arange(P - 1, P + N)
        branch[i, P - 1:P + C], branch[i, P + C:P + C + 1 + N] = 1, 2
        for side, span in enumerate((range(P - 1, P + C - 1), range(P + C, P + C + N))):
            rows += [i] * len(span)
            cols += span
            segment += [2 * i + side] * len(span)
    rows, cols = torch.tensor(rows), torch.tensor(cols)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    attention_mask = causal & ~((branch[:, :, None] == 2) & (branch[:, None, :] == 1))  # (R, T queries, T keys)
    return {
        "input_ids": input_ids.to(device), "positions": positions.to(device), "mask": attention_mask[:, None].to(device),
        "scored": (rows.to(device), cols.to(device)), "targets": input_ids[rows, cols + 1].to(device),
        "segment": torch.tensor(segment, device=device),
        "n_tokens": sum(len(p) + len(r["chosen_ids"]) + 1 + len(r["rejected_ids"]) for p, r in zip(prompts, records)),
    }


def autocast(cfg: HardwareConfig):
    device_type = torch.device(cfg.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def forward_logps(model, batch: dict, hw: HardwareConfig):
    """Summed log pi(y+ | prompt) and log pi(y- | prompt) of every row: two (R,) float32 tensors."""
    with autocast(hw):
        logits = model(batch["input_ids"], batch["positions"], batch["mask"], logits_index=batch["scored"])  # (N, V)
    # Outside autocast on purpose: token_logps takes the log-softmax in float32.
    logps = token_logps(logits, batch["targets"])  # (N,) log pi of each response token
    R = batch["input_ids"].shape[0]
    sums = torch.zeros(2 * R, dtype=logps.dtype, device=logps.device).index_add(0, batch["segment"], logps)  # (2R,)
    return sums[0::2], sums[1::2]


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
        write_atomically(path, "".join(json.dumps(done[r["id"]]) + "\n" for r in records))
        for r in range(world):
            (out / f"reference.rank{r}-of-{world}.partial.jsonl").unlink(missing_ok=True)
    barrier(world)
    return read_jsonl(path)


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: DPO. Plain PyTorch: AdamW, cosine schedule with warmup, gradient accumulation over micro-batches,
# DistributedDataParallel across processes, an atomic checkpoint every --save-minutes.
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


def train(model, records: list[dict], loss: LossConfig, opt: OptimConfig, hw: HardwareConfig, out: Path,
          rank: int, world: int, crash_at=None):
    """Stage 3: --epochs passes of DPO steps over the pairs (one, as the paper), from the last checkpoint if any."""
    G = opt.batch_size
    steps_per_epoch = len(records) // G  # the last partial batch of an epoch is dropped
    total_steps = steps_per_epoch * opt.epochs
    runs.keep_activations_in_the_heap()
    model.train()
    model.gradient_checkpointing = hw.gradient_checkpointing
    # Weights, gradients and AdamW moments stay float32 even with bf16 compute: an update of lr 5e-7 times a
    # unit Adam step is far below bf16's resolution (8 bits of mantissa) and would round away.
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay,
                                  eps=1e-8, fused=torch.device(hw.device).type in ("cpu", "cuda"))
    sparse_embedding_gradient(model, hw, world)
    checkpoint_path, metrics_path = out / ("checkpoint" if hw.shard else "checkpoint.pt"), out / "metrics.jsonl"
    start = runs.load_checkpoint(checkpoint_path, model, optimizer, hw.shard)  # --shard: a directory of per-rank shards
    saved = start  # the step of the last good checkpoint (0: none)
    zero_gradients(model, optimizer)
    if rank == 0:  # the metrics history of the run being resumed, without the steps that are done again
        write_atomically(metrics_path, "".join(json.dumps(x) + "\n" for x in read_jsonl(metrics_path) if x["step"] <= start))
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and not hw.shard else model
    saved_at = time.monotonic()
    with runs.StopRequest() as stop, tqdm(total=total_steps, initial=start, desc="DPO", unit="step", disable=rank != 0) as bar:
        for step in range(start, total_steps):
            epoch, position = divmod(step, steps_per_epoch)
            batch = [records[i] for i in epoch_order(len(records), opt.seed, epoch)[position * G:(position + 1) * G]]
            last_good = f"{checkpoint_path} (step {saved})" if saved else "none yet"
            metrics = {"step": step + 1, "epoch": (step + 1) / steps_per_epoch,
                       **dpo_step(model, ddp_model, optimizer, batch, step, total_steps, loss, opt, hw, rank, world, last_good)}
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
                bar.update(1)
                if step == 0:
                    bar.write(report.step0_message(metrics, loss))
            crash_hook(crash_at, "train", step + 1)
            # A checkpoint every --save-minutes (11 to 31 s for Qwen2.5-0.5B's 7.6 GB of weights and AdamW states,
            # by CPU), every --save-every steps if given, and after a Ctrl-C or SIGTERM; the final model ends the stage.
            due = bool(hw.save_every and (step + 1) % hw.save_every == 0) or \
                bool(hw.save_minutes and time.monotonic() - saved_at >= 60 * hw.save_minutes)
            due, stopping = any_rank([due, stop.signum is not None], world, hw.device)
            if stopping or (due and step + 1 < total_steps):
                runs.save_checkpoint(checkpoint_path, model, optimizer, step + 1, hw.shard, rank)
                saved, saved_at = step + 1, time.monotonic()
                barrier(world)
            if stopping:
                raise Interrupted(stop.signum)  # None here: another rank's signal stops this one too


def sparse_embedding_gradient(model, hw: HardwareConfig, world: int):
    """An untied input embedding's gradient is zero outside the batch's few hundred token rows, but nn.Embedding's
    backward builds it dense: a fresh (V, C) buffer zeroed at every step (545 MB for the bundled qwen: 0.9 s a step
    on 2 cores). In one process it comes out sparse instead, and autograd adds it in place into a dense gradient
    kept across steps (zero_gradients), in 2 ms: the same numbers up to float rounding (a token that occurs twice
    in a batch has its two rows summed in another order). A tied embedding (also the output projection, whose
    gradient is dense), DDP and FSDP keep the dense default."""
    model.model.embed_tokens.sparse = world == 1 and not hw.shard and not model.config.tie_word_embeddings


def zero_gradients(model, optimizer):
    """Every gradient to None, except the dense one a sparse embedding gradient is added into: zeroed in place
    (created before the first step), so AdamW always sees a dense gradient."""
    embedding = model.model.embed_tokens
    kept = embedding.weight.grad if embedding.sparse else None
    optimizer.zero_grad(set_to_none=True)
    if embedding.sparse:
        embedding.weight.grad = kept.zero_() if kept is not None else torch.zeros_like(embedding.weight)


def dpo_step(model, ddp_model, optimizer, batch: list[dict], step: int, total_steps: int, loss: LossConfig,
             opt: OptimConfig, hw: HardwareConfig, rank: int, world: int, last_good: str) -> dict:
    """One optimizer step on one global batch: this process's share forward and backward, the gradient clipped,
    AdamW at the step's learning rate. Returns the step's metrics over the whole batch."""
    t0 = time.time()
    lr = learning_rate(step, total_steps, opt)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if hw.shard:
        mine, weights = shard.shard_batch(batch, rank, world)
    else:
        per_rank = len(batch) // world  # pairs each process handles per step
        mine, weights = batch[rank * per_rank:(rank + 1) * per_rank], None
    stats, n_tokens = accumulate_gradients(ddp_model, mine, loss, opt, hw, world, weights)
    if hw.shard:
        grad_norm = shard.clip_grad_norm(model, opt.grad_clip)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip).item()
    stats = gather(stats, world, hw.device)[:len(batch)]  # (G, k): every pair of the global batch, on every rank
    batch_loss = stats[:, STAT_COLUMNS.index("loss")].mean().item()
    if not (math.isfinite(batch_loss) and math.isfinite(grad_norm)):
        # Every rank sees the same gathered numbers, so every rank stops here, before the update.
        raise MipoError(f"step {step + 1}: the loss is {batch_loss} and the gradient norm {grad_norm}; training "
                        f"stopped before the update. Last good checkpoint: {last_good}. Lower --lr or check the pairs")
    optimizer.step()
    zero_gradients(model, optimizer)
    metrics = step_metrics(stats, lr, grad_norm, n_tokens * world, time.time() - t0)
    if step == 0:
        metrics.update(step0_check(stats))
    return metrics


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


def any_rank(flags: list[bool], world: int, device) -> list[bool]:
    """Each flag, true when it is true on any process: ranks decide to checkpoint and to stop together."""
    if world == 1:
        return flags
    flags = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(f) for f in flags.tolist()]


def step_metrics(stats, lr, grad_norm, n_tokens, seconds) -> dict:
    col = {name: stats[:, i] for i, name in enumerate(STAT_COLUMNS)}
    return {
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
    sampling = config.resolve_sampling(cfg.sampling, cfg.model)  # the base model's defaults, as its samples had
    prompts = [tokenizer.apply_chat_template(p["prompt"]) for p in eval_pairs]
    completions = sampler.generate(model, prompts, **sampler.generate_kwargs(sampling),
                                   stop_token_ids=tokenizer.stop_token_ids, seed=cfg.seed,
                                   batch_size=2 * cfg.sample_batch_size, progress=False)
    resampled = []
    for pair, tokens in zip(eval_pairs, completions):
        text, stopped = mipo.response_text(tokenizer, tokens)
        resampled.append({**pair, "chosen": [{"role": "assistant", "content": text}], "chosen_stopped": stopped})
    return resampled


def trained_meter(cfg: PairsConfig, hw: HardwareConfig, final_dir: Path, eval_pairs: list[dict], eval_path: Path) -> dict:
    """The trained model samples its own responses to the held-out prompts; the base model scores them (the meter
    MIPO's claim is about), and the trained model too (pmi_self, for comparison only)."""
    task = get_task(cfg.task)
    eval_examples = load_examples(task, "eval", cfg.n_eval, cfg.data, cfg.eval_data)
    dtype = torch.bfloat16 if hw.dtype == "bfloat16" else torch.float32  # the dtype the base model was measured in
    policy, tokenizer = load_model(final_dir, hw.device, dtype)
    mipo.use_recorded_date(tokenizer, eval_pairs, eval_path)
    own = with_own_samples(policy, tokenizer, eval_pairs, cfg)
    pmi_self = mipo.mi_meter(policy, tokenizer, meter_rows(own))["pmi"]
    del policy
    reference, tokenizer = load_model(cfg.model, hw.device, dtype)
    mipo.use_recorded_date(tokenizer, eval_pairs, eval_path)
    return {**held_out_meter(reference, tokenizer, task, eval_examples, own), "pmi_self": pmi_self}


def main(argv=None):
    args = config.train_parser().parse_args(argv)
    pairs_cfg, loss_cfg, opt_cfg, hw, out = config.resolve_config(args)
    rank, world, hw.device = runs.init_distributed(hw.device)
    settings = {"pairs": asdict(pairs_cfg), "loss": asdict(loss_cfg), "optim": asdict(opt_cfg), "hardware": asdict(hw)}
    runs.check_inputs(pairs_cfg, opt_cfg, out, settings)  # every rank, before anything is written: all refuse alike
    if rank == 0:
        config.print_plan(pairs_cfg, loss_cfg, opt_cfg, hw, out, world)
        runs.start_run_dir(out, settings)
    barrier(world)
    torch.manual_seed(opt_cfg.seed)
    timings = {}

    t = time.time()
    pairs, eval_pairs, base_eval = make_pairs(pairs_cfg, hw, out, rank, world, args._crash_at)  # stage 1
    timings["pairs"] = time.time() - t
    pairs, pair_stats = pairs_to_train_on(pairs, pairs_cfg)
    if rank == 0:
        print(report.pairs_message(pair_stats, pairs_cfg), flush=True)
    if not (out / "final").exists():
        reference_and_dpo(pairs, pairs_cfg, loss_cfg, opt_cfg, hw, out, rank, world, timings, args._crash_at)  # stages 2-3
    if world > 1:
        # The sharded model's hooks form reference cycles that keep gloo's work objects alive; collected now, not while
        # the interpreter shuts down, where their C++ threads can abort the process after a run that succeeded.
        gc.collect()
        dist.destroy_process_group()
    if rank == 0:
        report.print_summary(run_summary(out, pair_stats, base_eval, eval_pairs, pairs_cfg, hw, timings), loss_cfg)  # stage 4


def pairs_to_train_on(pairs: list[dict], cfg: PairsConfig) -> tuple[list[dict], dict]:
    """The pairs stage 2 scores and stage 3 trains on, and the share of responses cut at --max-new-tokens per side."""
    stats = mipo.pair_stats(pairs)
    if cfg.drop_truncated:  # a cut response has no end-of-turn token: such a pair also teaches "stop" or "go on"
        pairs = [p for p in pairs if p.get("chosen_stopped", True) and p.get("rejected_stopped", True)]
    return pairs, {**stats, "trained_on": len(pairs)}


def reference_and_dpo(pairs, pairs_cfg: PairsConfig, loss_cfg: LossConfig, opt_cfg: OptimConfig, hw: HardwareConfig,
                      out: Path, rank: int, world: int, timings: dict, crash_at=None):
    """Stages 2 and 3 on the base model's float32 weights, then the trained model saved to out/final."""
    model, tokenizer = load_model(pairs_cfg.model, hw.device, torch.float32)
    mipo.use_recorded_date(tokenizer, pairs, pairs_cfg.pairs_file or out / "pairs.jsonl")
    if hw.shard:  # before the reference pass: it must run the very computation of training's step 0
        shard.shard_model(model, param_dtype=torch.bfloat16 if hw.dtype == "bfloat16" else None)
    t = time.time()
    records = reference_logps(model, tokenizer, pairs, loss_cfg, opt_cfg, hw, out, rank, world, crash_at)
    timings["reference"] = time.time() - t
    if len(records) < opt_cfg.batch_size:
        raise MipoError(f"{len(records)} pairs are fewer than one batch of --batch-size {opt_cfg.batch_size}; raise --n")
    t = time.time()
    train(model, records, loss_cfg, opt_cfg, hw, out, rank, world, crash_at)
    timings["train"] = time.time() - t
    final_model = shard.full_model_on_rank0(model) if hw.shard else model  # collective: every rank calls it
    if rank == 0:
        save_final(final_model, tokenizer, out)
    del model
    barrier(world)


def run_summary(out: Path, pair_stats: dict, base_eval, eval_pairs, pairs_cfg: PairsConfig, hw: HardwareConfig,
                timings: dict) -> dict:
    """summary.json (written once): the pairs, the step-0 check, the last step, the held-out meter before and after."""
    summary_path = out / "summary.json"
    if not summary_path.exists():
        history = read_jsonl(out / "metrics.jsonl")
        summary = {"final": str(out / "final"), "pairs": pair_stats, "step0": history[0], "last": history[-1],
                   "base_eval": base_eval, "trained_eval": None, "timings_s": timings}
        if eval_pairs:
            t = time.time()
            summary["trained_eval"] = trained_meter(pairs_cfg, hw, out / "final", eval_pairs, out / "eval_pairs.jsonl")
            timings["held_out_eval"] = time.time() - t
        write_atomically(summary_path, json.dumps(summary, indent=2))
    return json.loads(summary_path.read_text())


if __name__ == "__main__":
    run_command(main)
