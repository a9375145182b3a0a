"""MIPO training, the command a user runs (MIPO section 3; docs/walkthrough.md steps 5-13): the base model samples
its own preference pairs, scored once under the frozen base model; one epoch of DPO trains on them; the result is
saved as a Hugging Face model. Pairs: mipo.py; loss: dpo_loss.py; this file orders the stages.

    python train.py --model qwen                                     # CPU preset (README: set-up)
    python train.py --model qwen --preset paper                      # the paper's settings, for a GPU
    python train.py --model qwen --loss sigmoid ipo --beta 0.1 0.3   # a sweep: four variants
    torchrun --nproc_per_node 2 train.py -- --model qwen             # DDP: gloo on CPU, nccl on GPU

Each stage writes a file in --out and is skipped when that file is complete, so the same command resumes after a
kill: config.json, pairs.jsonl and eval_pairs.jsonl + base_eval.json (stage 1), reference.jsonl (stage 2),
checkpoint.pt and metrics.jsonl (stage 3), final/ (stage 4), summary.json (the held-out meter); then, rewritten at
every end, pmi.html (the held-out answers token by token: bookkeeping/pmi_page.py) and curves.png.

Shape legend: B pairs in a micro-batch, R rows in its forward (B, or 2B for the losses that also score both responses
under x'), T padded tokens, V vocabulary.
"""
import math
import shutil
import time
from pathlib import Path

import torch

import mipo
from bookkeeping import config, held_out, pmi_page, report, runs, sweep
from bookkeeping.config import HardwareConfig, OptimConfig, PairsConfig
from bookkeeping.runs import Run
from dpo_loss import LOSSES, preference_loss, preference_metrics, token_logps
from formats import pairs_file
from formats.dtypes import torch_dtype
from formats.files import MipoError, run_command
from model_loader import free_memory, load_model, save_model
from tasks import get_task, load_examples
from transforms import cpu_speedups, lora, shard

LN2 = math.log(2)
STEP0_TOLERANCE = 1e-3  # nats, on summed log-probs: see step0_check


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: pairs. The base model samples y+ from x and y- from x' (another prompt, or x without its context),
# both stored under x (MIPO section 3; mipo.build_pairs, resumable).
# ---------------------------------------------------------------------------------------------------------------


def make_pairs(run: Run):
    """-> (training pairs, held-out pairs, the base model's held-out meter or None)."""
    cfg = run.pairs
    task = get_task(cfg.task)
    # shared by a sweep's variants (bookkeeping/sweep.py)
    pairs_path, eval_path = run.shared_file("pairs.jsonl"), run.shared_file("eval_pairs.jsonl")
    # recorded with the pairs: what the flags leave to the model (top-k, the penalty) taken from it
    settings = mipo.sampling_settings(mipo.resolve_sampling(cfg.sampling, cfg.model), cfg.seed, cfg.model)
    if cfg.pairs_file:
        train_examples, pairs = None, runs.read_pairs_file(Path(cfg.pairs_file), cfg)
    else:
        train_examples = load_examples(task, "train", cfg.n, cfg.data, cfg.eval_data)
        pairs = pairs_file.read_complete_pairs(pairs_path, task, train_examples, cfg.negative, settings)
    eval_examples = load_examples(task, "eval", cfg.n_eval, cfg.data, cfg.eval_data) if cfg.n_eval > 0 else []
    eval_pairs = (
        pairs_file.read_complete_pairs(eval_path, task, eval_examples, cfg.negative, settings) if eval_examples else []
    )
    base_meter_missing = bool(eval_examples) and not run.shared_file("base_eval.json").exists()
    if pairs is None or eval_pairs is None or base_meter_missing:
        # Compute-dtype weights: the KV cache takes theirs; bf16 is faster where native (formats/dtypes.py).
        model, tokenizer = load_model(cfg.model, run.hw.device, torch_dtype(run.hw.dtype, run.hw.device))
        cpu_speedups.apply(model)
        model.compile_decode = run.hw.compile  # --compile: sampler.generate reads it
        if pairs is None:  # under torchrun each process samples its share
            pairs = runs.build_pairs(run, model, tokenizer, task, train_examples, pairs_path)
        if eval_pairs is None:
            eval_pairs = runs.build_pairs(run, model, tokenizer, task, eval_examples, eval_path)
        held_out.write_base_meter(run, model, tokenizer, task, eval_examples, eval_pairs)  # the meter before training
        del model
        free_memory()  # now, before stage 2 loads the float32 weights
    run.link_shared("pairs.jsonl", "eval_pairs.jsonl", "base_eval.json", held_out.BASE_TOKENS)
    return pairs, eval_pairs, held_out.read_base_meter(run)


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: frozen reference log-probs: one no-grad pass of the base model scores y+ and y- under x, stored with
# the token ids. pi_ref enters DPO's loss (Eq. 7) only through these: no reference model stays in memory.
# ---------------------------------------------------------------------------------------------------------------


def tokenize_pair(tokenizer, pair: dict, with_negative_prompt: bool, context_window: int) -> dict:
    # mipo.encode_turn cuts the completion (with end-of-turn when the sample stopped) as the meter does.
    record = {"id": pair["id"]}
    for key in ("chosen", "rejected"):
        prompt_ids, response_ids = mipo.encode_turn(
            tokenizer, pair["prompt"], pair[key][0]["content"], pair.get(f"{key}_stopped", True)
        )
        if not response_ids:
            raise MipoError(
                f"pair {pair['id']!r}: the {key} response is empty and was not stopped; it has no token to score"
            )
        if len(prompt_ids) + len(response_ids) > context_window:
            raise MipoError(
                f"pair {pair['id']!r}: prompt + {key} response is {len(prompt_ids) + len(response_ids)} tokens, "
                f"more than the model's context window of {context_window}"
            )
        record["prompt_ids"], record[f"{key}_ids"], record[f"{key}_length"] = (
            prompt_ids, response_ids, len(response_ids)
        )
    if with_negative_prompt:  # infonce / sami also score both responses under x'
        if not pair.get("negative_prompt"):
            raise MipoError(
                f"pair {pair['id']!r} has no 'negative_prompt' (the prompt x' the negative was sampled from); "
                "--loss infonce and sami need it: rebuild the pairs with mipo.py"
            )
        for key in ("chosen", "rejected"):
            negative_prompt_ids, response_ids = mipo.encode_turn(
                tokenizer, pair["negative_prompt"], pair[key][0]["content"], pair.get(f"{key}_stopped", True)
            )
            if response_ids != record[f"{key}_ids"]:
                raise MipoError(
                    f"pair {pair['id']!r}: the chat template tokenizes the {key} response differently under x'; "
                    "--loss infonce and sami are not supported with this template"
                )
        record["negative_prompt_ids"] = negative_prompt_ids
    return record


# Training rows by device: packed on a CPU (1.78x faster there, bench/profile_step.py --layout both); two causal rows
# on a GPU, whose flash attention kernel takes no mask (docs/performance.md)
PACKED = {"cpu": True, "cuda": False}


def collate(records: list[dict], with_negative_prompt: bool, device, packed: bool | None = None) -> dict:
    """Right-padded rows of token ids, and which positions score which response (docs/walkthrough.md step 5).

    packed (the CPU's default, PACKED): one row per pair, x once and both responses: [x, y+, x[-1], y-]. The copy
    of x[-1] and y- see x[:-1], not y+ or the original x[-1], and their positions restart where x ends: exactly a
    separate x + y-, with x run once (~40% fewer tokens), for an attention mask. Else two causal rows per pair,
    [x, y+] and [x, y-]: no mask, so a GPU runs its fused (flash) attention kernel. infonce / sami add rows under
    x'. Masks come from the lengths, never from a pad id.
    """
    if packed is None:
        packed = PACKED.get(torch.device(device).type, False)
    prompts = [r["prompt_ids"] for r in records]
    if with_negative_prompt:
        prompts += [r["negative_prompt_ids"] for r in records]
        records = records + records
    if packed:
        rows_of = [[p + r["chosen_ids"] + p[-1:] + r["rejected_ids"]] for p, r in zip(prompts, records)]
    else:
        rows_of = [[p + r["chosen_ids"], p + r["rejected_ids"]] for p, r in zip(prompts, records)]
    ids = [row for rows in rows_of for row in rows]
    T = max(len(row) for row in ids)
    input_ids = torch.zeros(len(ids), T, dtype=torch.long)  # (R, T); any id pads: no real token attends to a pad
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row)
    # Positions whose logits score a response token (t scores t + 1). Only these go through the output projection
    # (a quarter of Qwen's FLOPs per token) and the log-softmax.
    rows, cols, segment = [], [], []  # (N,) each: row, position, and 2 * prompt row + (0 for y+, 1 for y-)
    for i, (prompt, r) in enumerate(zip(prompts, records)):
        P, C, N = len(prompt), len(r["chosen_ids"]), len(r["rejected_ids"])
        if packed:  # y+ scored from x[-1] on, y- from its copy on
            spans = ((i, range(P - 1, P + C - 1)), (i, range(P + C, P + C + N)))
        else:
            spans = ((2 * i, range(P - 1, P + C - 1)), (2 * i + 1, range(P - 1, P + N - 1)))
        for side, (row, span) in enumerate(spans):
            rows += [row] * len(span)
            cols += span
            segment += [2 * i + side] * len(span)
    rows, cols = torch.tensor(rows), torch.tensor(cols)
    positions = mask = None  # two causal rows: positions 0..T-1, causal attention
    if packed:
        branch = torch.zeros(len(ids), T, dtype=torch.long)  # (R, T) 0: x[:-1] and pads, 1: x[-1] + y+, 2: y- branch
        positions = torch.zeros(len(ids), T, dtype=torch.long)  # (R, T) RoPE positions
        for i, (prompt, r) in enumerate(zip(prompts, records)):
            P, C, N = len(prompt), len(r["chosen_ids"]), len(r["rejected_ids"])
            positions[i, :P + C] = torch.arange(P + C)
            positions[i, P + C:P + C + 1 + N] = torch.arange(P - 1, P + N)
            branch[i, P - 1:P + C], branch[i, P + C:P + C + 1 + N] = 1, 2
        causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
        mask = (causal & ~((branch[:, :, None] == 2) & (branch[:, None, :] == 1)))[:, None]  # (R, 1, T, T)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return {
        "input_ids": input_ids.to(device), "positions": to(positions), "mask": to(mask),
        "scored": (rows.to(device), cols.to(device)), "targets": input_ids[rows, cols + 1].to(device),
        "segment": torch.tensor(segment, device=device), "pairs": len(prompts),
        "n_tokens": sum(len(row) for row in ids),
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
    R = batch["pairs"]  # prompt rows: y+ and y- of each
    sums = torch.zeros(2 * R, dtype=logps.dtype, device=logps.device).index_add(0, batch["segment"], logps)  # (2R,)
    return sums[0::2], sums[1::2]


@torch.no_grad()
def reference_logps(model, tokenizer, pairs: list[dict], run: Run) -> list[dict]:
    """Every pair's ids, lengths, log pi_ref(y+|x) and log pi_ref(y-|x) in reference.jsonl; split as training is."""
    with_negative_prompt = LOSSES[run.loss.loss].negative_prompt
    records = [tokenize_pair(tokenizer, p, with_negative_prompt, model.config.max_position_embeddings) for p in pairs]
    model.eval()

    def score(batch: list[dict]) -> list[dict]:
        chosen, rejected = forward_logps(model, collate(batch, with_negative_prompt, run.hw.device), run.hw)
        # Rows [:B] are under x (B more under x' for infonce / sami).
        return [{**r, "ref_chosen_logps": c, "ref_rejected_logps": x}
                for r, c, x in zip(batch, chosen.tolist(), rejected.tolist())]

    batches = run.reference_batches(records, epoch_order(len(records), run.optim.seed, 0))
    kind = "xprime" if with_negative_prompt else ""  # in a sweep, one pass per kind
    records = runs.resumable_pass(run, run.shared_file("reference.jsonl", kind), records, batches, score,
                                  "reference log-probs")
    run.link_shared("reference.jsonl", kind=kind)
    return records


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: DPO in plain PyTorch: AdamW, cosine schedule with warmup, gradient accumulation, DDP, an atomic
# checkpoint every --save-minutes.
# ---------------------------------------------------------------------------------------------------------------


def learning_rate(step: int, total_steps: int, cfg: OptimConfig) -> float:
    # The paper's cosine_with_min_lr, as transformers' get_cosine_with_min_lr_schedule_with_warmup computes it:
    # linear warmup from 0 over ceil(3%) of the steps (step 0 runs at lr 0, moving no weight), then cosine down
    # to min_lr_ratio * lr. A pure function of the step: nothing to checkpoint.
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.lr * (float(step) / float(max(1, warmup)))
    progress = float(step - warmup) / float(max(1, total_steps - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * max(0.0, factor * (1 - cfg.min_lr_ratio) + cfg.min_lr_ratio)


def epoch_order(n_pairs: int, seed: int, epoch: int) -> list[int]:
    # Depends only on (seed, epoch): a resumed run sees the pairs in the same order.
    return torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


# A step's per-pair numbers: the columns of a (B, k) tensor, for processes to gather.
STAT_COLUMNS = ("loss", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps", "chosen_lengths",
                "rejected_lengths", "abs_logp_diff")


def train(model, tokenizer, records: list[dict], run: Run):
    """Stages 3 and 4: --epochs of DPO steps (the paper: one), resumed from a checkpoint; then the model saved."""
    opt, G = run.optim, run.optim.batch_size
    steps_per_epoch = len(records) // G  # the last partial batch of an epoch is dropped
    total_steps = steps_per_epoch * opt.epochs
    model.train()
    model.gradient_checkpointing = run.hw.gradient_checkpointing
    if opt.lora_rank:  # transforms/lora.py; the paper trains every weight
        lora.add_adapters(model, opt.lora_rank, opt.lora_alpha, opt.lora_targets, opt.seed)
    # float32 weights, grads and AdamW moments under bf16 compute: a 5e-7 update would round away in bf16's 8 bits.
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay,
                                  eps=1e-8, fused=torch.device(run.hw.device).type in ("cpu", "cuda"))
    cpu_speedups.for_dpo(model, run.world, run.hw.shard)
    policy = run.wrap(model)  # DDP over several processes
    with runs.Steps(run, model, optimizer, total_steps) as steps:  # resumes from the last checkpoint; Ctrl-C
        for step in range(steps.start, total_steps):
            epoch, position = divmod(step, steps_per_epoch)
            batch = [records[i] for i in epoch_order(len(records), opt.seed, epoch)[position * G:(position + 1) * G]]
            lr = learning_rate(step, total_steps, opt)
            t0 = time.time()
            stats, grad_norm, n_tokens = dpo_step(policy, optimizer, batch, lr, step, run)
            metrics = {"step": step + 1, "epoch": (step + 1) / steps_per_epoch,
                       **step_metrics(stats, lr, grad_norm, n_tokens, time.time() - t0)}
            if step == 0:
                metrics.update(step0_check(stats))
            steps.log(metrics)  # metrics.jsonl and the progress bar
            if steps.checkpoint_due(step + 1):  # every --save-minutes, and after a Ctrl-C or SIGTERM
                steps.save_checkpoint(step + 1)  # model, AdamW, the step, RNG states; then stops after a Ctrl-C
    save_final(model, tokenizer, run)  # stage 4


def dpo_step(policy, optimizer, batch: list[dict], lr: float, step: int, run: Run):
    """One AdamW step on a global batch (DPO Eq. 7 for MIPO's sigmoid), accumulated over this process's micro-batches.
    -> per-pair stats (G, k), the clipped gradient's norm, the tokens all processes ran."""
    with_negative_prompt = LOSSES[run.loss.loss].negative_prompt
    rows, n_tokens = [], 0
    for micro, weights in run.micro_batches(policy, batch):  # this process's share; weights sum to its part of 1
        tensors = collate(micro, with_negative_prompt, run.hw.device)
        chosen_logps, rejected_logps = forward_logps(policy, tensors, run.hw)  # (R,) each
        inputs = loss_inputs(chosen_logps, rejected_logps, micro, run.loss.options())
        losses, chosen_rewards, rejected_rewards = preference_loss(run.loss.loss, beta=run.loss.beta, **inputs)
        (losses * weights.to(losses.device)).sum().backward()  # summed: the gradients accumulate the batch's mean
        rows.append(stat_rows(losses, chosen_rewards, rejected_rewards, inputs))
        n_tokens += tensors["n_tokens"]
    grad_norm = run.clip_grad_norm(policy, run.optim.grad_clip)
    stats = run.gather(torch.cat(rows))[:len(batch)]  # (G, k): every pair of the global batch, on every process
    batch_loss = stats[:, STAT_COLUMNS.index("loss")].mean().item()
    if not (math.isfinite(batch_loss) and math.isfinite(grad_norm)):
        # The gathered numbers are the same on every process: all stop here, before the update.
        raise MipoError(f"step {step + 1}: the loss is {batch_loss} and the gradient norm {grad_norm}; training "
                        "stopped before the update. Lower --lr or check the pairs")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats, grad_norm, n_tokens * run.world


def loss_inputs(chosen_logps, rejected_logps, micro: list[dict], options: dict) -> dict:
    """preference_loss's keyword arguments for a micro-batch of B pairs, from forward_logps' (R,) sums."""
    B, device = len(micro), chosen_logps.device
    inputs = {
        "policy_chosen_logps": chosen_logps[:B], "policy_rejected_logps": rejected_logps[:B],  # (B,) log pi(y|x)
        "ref_chosen_logps": torch.tensor([r["ref_chosen_logps"] for r in micro], device=device),  # (B,) float32
        "ref_rejected_logps": torch.tensor([r["ref_rejected_logps"] for r in micro], device=device),
        "chosen_lengths": torch.tensor([r["chosen_length"] for r in micro], device=device),
        "rejected_lengths": torch.tensor([r["rejected_length"] for r in micro], device=device),
        **options,
    }
    if len(chosen_logps) == 2 * B:  # infonce / sami: rows B: are the same pairs under x'
        under_x = torch.stack([chosen_logps[:B], rejected_logps[:B]], dim=1)  # (B, 2 responses)
        under_x_prime = torch.stack([chosen_logps[B:], rejected_logps[B:]], dim=1)  # (B, 2 responses)
        inputs["logps_matrix"] = torch.stack([under_x, under_x_prime], dim=1)  # (B, prompt x|x', response y+|y-)
    return inputs


def stat_rows(losses, chosen_rewards, rejected_rewards, inputs: dict):
    chosen, rejected = inputs["policy_chosen_logps"].detach(), inputs["policy_rejected_logps"].detach()
    # for step0_check (policy == reference at step 0)
    abs_diff = torch.maximum(
        (chosen - inputs["ref_chosen_logps"]).abs(), (rejected - inputs["ref_rejected_logps"]).abs()
    )
    return torch.stack([losses.detach(), chosen_rewards, rejected_rewards, chosen, rejected,
                        inputs["chosen_lengths"].float(), inputs["rejected_lengths"].float(), abs_diff],
                       dim=1).float().cpu()  # (B, k)


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
    # At step 0 the policy IS the reference (rewards 0, loss ln 2) on the reference pass's own micro-batches: the
    # tolerance only absorbs nondeterministic GPU kernels (docs/walkthrough.md step 10).
    diff = stats[:, STAT_COLUMNS.index("abs_logp_diff")].max().item()
    return {"step0/max_abs_logp_diff": diff, "step0/tolerance": STEP0_TOLERANCE, "step0/ok": diff <= STEP0_TOLERANCE}


# ---------------------------------------------------------------------------------------------------------------
# Stage 4: the final model, in Hugging Face layout, then the held-out meter of the trained model.
# ---------------------------------------------------------------------------------------------------------------


def save_final(model, tokenizer, run: Run) -> None:
    """The trained model in Hugging Face layout, written under a temporary name then renamed; the checkpoint deleted."""
    final_model = shard.full_model_on_rank0(model) if run.hw.shard else model  # collective: every rank calls it
    if run.rank == 0:
        if run.optim.lora_rank:  # the adapter alone in PEFT's layout, then merged into the weights
            opt = run.optim
            lora.save_adapter(model, run.pairs.model, run.out / "adapter", opt.lora_rank, opt.lora_alpha,
                              opt.lora_targets)
            lora.merge(model)
        save_model(final_model, tokenizer, run.out / "final")
        (run.out / "checkpoint.pt").unlink(missing_ok=True)
        shutil.rmtree(run.out / "checkpoint", ignore_errors=True)  # --shard's: a directory of per-rank shards
    run.barrier()


def main(argv=None):
    variants = sweep.variants(config.train_parser().parse_args(argv))  # one run, or each combination of a sweep
    if len(variants) > 1:
        for args in variants:  # every variant checked before any work
            runs.check(args)
        if runs.rank_zero():
            sweep.start(variants)
    for args in variants:
        train_run(args)
    if len(variants) > 1 and runs.rank_zero():
        sweep.print_table(variants)
        sweep.plot_curves(variants)


def train_run(args):
    run = runs.start(args)  # settings checked, processes joined, run directory
    with run.timed("pairs"):
        pairs, eval_pairs, base_eval = make_pairs(run)  # stage 1
    pairs, pair_stats = pairs_to_train_on(pairs, run.pairs)
    if run.rank == 0:
        print(report.pairs_message(pair_stats, run.pairs), flush=True)
    if not (run.out / "final").exists():
        # Stages 2 to 4 on the base model's float32 weights.
        model, tokenizer = load_model(run.pairs.model, run.hw.device, torch.float32)
        cpu_speedups.apply(model)
        pairs_file.use_recorded_date(tokenizer, pairs, run.pairs.pairs_file or run.out / "pairs.jsonl")
        if run.hw.shard:  # before the reference pass: it must run the very computation of training's step 0
            shard.shard_model(model, param_dtype=torch.bfloat16 if run.hw.dtype == "bfloat16" else None)
        with run.timed("reference"):
            records = reference_logps(model, tokenizer, pairs, run)  # stage 2
        if len(records) < run.optim.batch_size:
            raise MipoError(f"{len(records)} pairs are fewer than one batch of --batch-size {run.optim.batch_size}; "
                            "raise --n")
        with run.timed("train"):
            train(model, tokenizer, records, run)  # stages 3 and 4
        del model
        free_memory()  # now, before the held-out meter loads the trained model
    run.finish()
    if run.rank == 0:
        summary = held_out.run_summary(run, pair_stats, base_eval, eval_pairs)  # with the held-out meter after
        report.print_summary(summary)
        print(f"page: {pmi_page.write_run_page(run.out)} (the held-out answers token by token, and the pairs)")
        if report.plot_training_curves(run.out, run.out / "curves.png"):
            print(f"curves: {run.out / 'curves.png'}")


def pairs_to_train_on(pairs: list[dict], cfg: PairsConfig) -> tuple[list[dict], dict]:
    """The pairs stage 2 scores and stage 3 trains on, and the share of responses cut at --max-new-tokens per side."""
    stats = mipo.pair_stats(pairs)
    if cfg.drop_truncated:  # a cut response has no end-of-turn token: such a pair also teaches "stop" or "go on"
        pairs = [p for p in pairs if p.get("chosen_stopped", True) and p.get("rejected_stopped", True)]
    return pairs, {**stats, "trained_on": len(pairs)}


if __name__ == "__main__":
    run_command(main)
