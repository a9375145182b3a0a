"""Settings: one dataclass per concern (pairs, loss, optimization, hardware), the two presets, and the command
lines of train.py and eval.py (mipo.py parses its own few flags, and defines the sampling flags all three share).
Every value a run uses is resolved here, in one place, before anything runs; the scripts read the resulting dataclasses.
"""
import argparse
import math
import os
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from dpo_loss import F_DIVERGENCES, LOSS_TYPES, LOSSES, OPTIONS, check_options
from formats.dtypes import AUTO_DTYPE, DTYPES, compute_dtype
from formats.files import MipoError, numbered_jsonl, read_json
from formats.model_sources import local_model, resolve_model_dir
from formats.tokenizer import Tokenizer
from mipo import SPEEDUPS_OFF, add_sampling_flags, resolve_sampling, sampling_from_flags
from model_loader import ModelConfig
from sampler import Sampling
from tasks import NEGATIVES, TASKS, get_task, load_examples, prompt_messages
from transforms import cpu_speedups, shard
from transforms.lora import TARGETS as LORA_TARGETS

EVAL_N_DEFAULT = {"cpu": 50, "gpu": 200}  # held-out items eval.py takes; 200 is the whole persona / gsm8k held-out set
# A judge reply without an integer: skipped, as the paper does (the mean is over the preferences that gave a score; an
# item with none has no score and never wins), or counted as 1, the lowest score.
JUDGE_UNPARSED = ("skip", "one")
# GSM8K, an answer without a number after '####': the same model asked to extract it, as the paper does (model), or
# this project's rules (tasks.extract_number: \boxed{}, "the answer is", the last number).
ANSWER_FALLBACKS = ("model", "rules")
DEFAULT_JUDGE = "qwen"  # the largest bundled model; on a GPU pass a larger local checkpoint


# ---------------------------------------------------------------------------------------------------------------
# Training settings: one dataclass per concern, then the presets. A flag left out takes the preset's value.
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
    sampling: Sampling | None = None  # None: the task's (paper or CPU) settings
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
    temperature: float | None = None  # infonce / sami; None: the default in the loss's row of dpo_loss.LOSSES

    def __post_init__(self):
        if self.temperature is None:  # an unknown loss keeps OPTIONS' value; check_options refuses it
            defaults = LOSSES[self.loss].defaults if self.loss in LOSSES else {}
            self.temperature = defaults.get("temperature", OPTIONS["temperature"])

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
    lora_rank: int = 0  # 0: every weight trained (the paper); R: low-rank adapters only (transforms/lora.py)
    lora_alpha: float | None = None  # the adapters' scale alpha / R; None: 2R
    lora_targets: tuple = LORA_TARGETS

    def __post_init__(self):
        if self.lora_alpha is None and self.lora_rank:
            self.lora_alpha = 2.0 * self.lora_rank


@dataclass
class HardwareConfig:
    device: str = "cpu"
    dtype: str = "float32"  # compute dtype: bfloat16 = matmuls under autocast; weights and AdamW stay float32
    gradient_checkpointing: bool = False
    compile: bool = False  # sampling's decode step through torch.compile (--compile)
    shard: bool = False  # FSDP2 over the torchrun processes (transforms/shard.py)
    save_minutes: float = 10.0  # minutes of DPO between checkpoints (0: not by time); Ctrl-C and SIGTERM write one too
    save_every: int | None = None  # optimizer steps between checkpoints, besides the clock (None: by the clock only)


PRESETS = {
    # `python train.py --model qwen` on 2 CPU cores: a short run end to end (README: set-up). 64 pairs
    # at batch 4 are 16 optimizer steps; at the paper's lr of 5e-7 the policy would barely move in 16 steps, so this
    # preset trains 4x faster. Measured on Qwen2.5-0.5B, persona: lr 2e-6 raises the held-out pointwise MI under the
    # base model from about 12 to 19-30 nats (16 prompts, by CPU and dtype); 1e-5 overshoots (chosen log-probs down
    # by 45 nats, the held-out preference score down). Sampling: the task's CPU settings.
    "cpu": dict(n=64, n_eval=16, lr=2e-6, batch_size=4, micro_batch_size=4, sampling="cpu"),
    # The paper: every training prompt, each task's own sampling (tasks.py), lr 5e-7, global batch 4, beta 0.1,
    # one epoch.
    "paper": dict(n=None, n_eval=200, lr=5e-7, batch_size=4, micro_batch_size=4, sampling="paper"),
}

# ---------------------------------------------------------------------------------------------------------------
# train.py's flags that take a list (a sweep).
# ---------------------------------------------------------------------------------------------------------------


class OneOrMany(argparse.Action):
    """A flag that takes one value, or several for a sweep (bookkeeping/sweep.py): one value is stored as it is."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else values)


MANY = dict(nargs="+", action=OneOrMany)  # train.py's flags that take a list: swept, or refused as a list


# ---------------------------------------------------------------------------------------------------------------
# train.py: the command line. Flags default to None so that the preset fills in whatever was not given.
# ---------------------------------------------------------------------------------------------------------------


def flag_error(message):
    raise MipoError(f"bad flag: {message}")


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="MIPO: sample pairs from the base model, score them under it, "
                                                 "train one epoch of DPO, save a Hugging Face model. Several values "
                                                 "of a loss or optimization flag (--loss sigmoid ipo --beta 0.1 0.3) "
                                                 "train every combination from one pairs file and reference pass.",
                                     epilog=SPEEDUPS_OFF)
    parser.error = flag_error  # argparse would print its usage block; one line instead, and exit status 2
    g = parser.add_argument_group("model")
    g.add_argument("--model", **MANY, default="qwen",
                   help="bundled model (qwen, llama, smollm2), a Hugging Face directory, or a hub name such as "
                        "Qwen/Qwen2.5-1.5B-Instruct, downloaded once with huggingface_hub (default qwen)")
    g.add_argument("--revision", default=None,
                   help="with a hub name: the commit (or branch, tag) to download (default main)")
    g.add_argument("--preset", choices=PRESETS, default=None, help="cpu: a short run on 2 CPU cores; paper: the "
                   "paper's settings (default: cpu on a CPU, paper on a GPU)")
    g = parser.add_argument_group("data / pairs (stage 1)")
    g.add_argument("--task", **MANY, default="persona", help=f"one of {', '.join(TASKS)} (default persona)")
    g.add_argument("--data", default=None, help="--task jsonl: the prompts file (every fifth item is held out)")
    g.add_argument("--eval-data", default=None,
                   help="--task jsonl: a separate file of held-out prompts (then all of --data trains)")
    g.add_argument("--negative", **MANY, choices=NEGATIVES, default=None,
                   help="random: the response sampled for another prompt (one sampling pass, the paper's); "
                        "incomplete: sampled from x without its user context or with a sentence dropped; "
                        "random-resample: sampled again from another prompt, or from x under another user's "
                        "context (default: the task's)")
    g.add_argument("--n", **MANY, type=int, default=None,
                   help="training prompts, hence pairs (preset: cpu 64, paper all; 0: all)")
    g.add_argument("--n-eval", type=int, default=None,
                   help="held-out prompts for the pointwise-MI meter and the task metric (0: none)")
    g.add_argument("--pairs", default=None, help="train on this pairs file (mipo.py's format) instead of sampling")
    g = add_sampling_flags(parser, "sampling (stage 1; defaults: the task's, shortened on a CPU)", MANY)
    g.add_argument("--sample-batch-size", type=int, default=16, help="prompts per generate call (default 16)")
    g.add_argument("--drop-truncated", action="store_true", help="train only on pairs whose two responses both ended "
                   "before --max-new-tokens (default: keep every pair, as the paper)")
    g = parser.add_argument_group("loss (stage 3)")
    g.add_argument("--loss", **MANY, choices=LOSS_TYPES, default="sigmoid",
                   help="preference loss (default sigmoid: DPO, as MIPO)")
    g.add_argument("--beta", **MANY, type=float, default=0.1,
                   help="DPO's beta, the strength of the pull to the reference (default 0.1)")
    g.add_argument("--label-smoothing", **MANY, type=float, default=0.0,
                   help="cDPO / robust / EXO: label-flip probability")
    g.add_argument("--reference-free", action="store_true", help="drop pi_ref from the loss")
    g.add_argument("--rpo-alpha", **MANY, type=float, default=None, help="RPO: add alpha x the chosen response's NLL")
    g.add_argument("--f-divergence-type", **MANY, choices=F_DIVERGENCES, default="reverse_kl", help="f-DPO divergence")
    g.add_argument("--f-alpha-divergence-coef", **MANY, type=float, default=0.5, help="f-DPO alpha (alpha_divergence)")
    g.add_argument("--discopop-tau", **MANY, type=float, default=0.05, help="DiscoPOP temperature")
    g.add_argument("--simpo-gamma", **MANY, type=float, default=0.5, help="SimPO target margin")
    g.add_argument("--bco-delta", **MANY, type=float, default=None, help="BCO reward shift (default: the batch mean)")
    g.add_argument("--loss-temperature", **MANY, type=float, default=None,
                   help="infonce / sami: log-probs are divided by it (default: infonce 100 as the official "
                        "trainer, sami 1)")
    g = parser.add_argument_group("optimization (stage 3)")
    g.add_argument("--lr", **MANY, type=float, default=None, help="peak learning rate (preset: cpu 2e-6, paper 5e-7)")
    g.add_argument("--warmup-ratio", type=float, default=0.03,
                   help="fraction of steps with linear warmup (default 0.03)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="the cosine ends at this fraction of --lr (default 0.1)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (default 1.0)")
    g.add_argument("--epochs", **MANY, type=int, default=1, help="passes over the pairs (default 1, as the paper)")
    g.add_argument("--batch-size", **MANY, type=int, default=None,
                   help="global batch: pairs per optimizer step (default 4)")
    g.add_argument("--micro-batch-size", **MANY, type=int, default=None,
                   help="pairs per forward on each process (default 4); the update does not depend on it")
    g.add_argument("--seed", **MANY, type=int, default=0, help="seed of the sampling and of the data order (default 0)")
    g = parser.add_argument_group("low-rank adapters (stage 3; default: every weight trained, as the paper)")
    g.add_argument("--lora-rank", **MANY, type=int, default=0,
                   help="train rank-R adapters beside the linear layers instead of every weight (default 0: off)")
    g.add_argument("--lora-alpha", **MANY, type=float, default=None, help="the adapters' scale is alpha / R "
                   "(default 2R)")
    g.add_argument("--lora-targets", nargs="+", choices=LORA_TARGETS, default=list(LORA_TARGETS),
                   help="the linear layers that get an adapter (default: all of attention and MLP)")
    g = parser.add_argument_group("run / checkpoint")
    g.add_argument("--out", default=None,
                   help="run directory (default runs/MODEL-TASK-NEGATIVE-LOSS); the model goes to OUT/final")
    g.add_argument("--save-minutes", type=float, default=10.0,
                   help="minutes of DPO between checkpoints (default 10; 0: not by time); Ctrl-C or SIGTERM also "
                        "writes one after the step in flight, then stops")
    g.add_argument("--save-every", type=int, default=None, help="also write a checkpoint every N optimizer steps")
    g.add_argument("--_crash-at", default=None, help=argparse.SUPPRESS)  # test hook, see crash_hook
    g = parser.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="compute dtype; bfloat16 runs matmuls in bf16 under "
                   f"autocast, weights and AdamW stay float32 (default {AUTO_DTYPE})")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute each layer in backward: less memory, more time (--preset paper on a GPU turns it "
                        "on when the model needs it)")
    g.add_argument("--shard", action="store_true",
                   help="FSDP2: shard weights, gradients and AdamW states over the torchrun processes (bf16 compute "
                        "over float32 master weights with --dtype bfloat16); docs/scaling.md")
    return parser


def resolve_config(args):
    """Flags and the preset -> the four configs, each value from exactly one place, with every check up front."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset or ("cpu" if torch.device(device).type == "cpu" else "paper")]
    task = get_task(args.task)
    check_ranges(args)
    sampling = sampling_from_flags(args, task.cpu if preset["sampling"] == "cpu" else task.paper)
    loss = loss_config(args)  # checked before local_model, which downloads a hub name
    pairs = PairsConfig(model=local_model(args.model, args.revision), task=args.task, data=args.data,
                        eval_data=args.eval_data, negative=args.negative or task.negative,
                        n=preset["n"] if args.n is None else (args.n or None),
                        n_eval=preset["n_eval"] if args.n_eval is None else args.n_eval, pairs_file=args.pairs,
                        sampling=sampling, sample_batch_size=args.sample_batch_size, seed=args.seed,
                        drop_truncated=args.drop_truncated)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch_size = args.batch_size or preset["batch_size"]
    # By default each process runs its whole share of the global batch in one forward, up to the preset's micro-batch.
    micro_batch_size = args.micro_batch_size or min(preset["micro_batch_size"], math.ceil(batch_size / world))
    opt = OptimConfig(lr=args.lr or preset["lr"], weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                      min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip, epochs=args.epochs,
                      batch_size=batch_size, micro_batch_size=micro_batch_size, seed=args.seed,
                      lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets))
    if opt.lora_rank and args.shard:
        raise MipoError("--lora-rank with --shard: not supported; FSDP2 here shards every weight with its AdamW "
                        "state, which adapters leave frozen or absent: run LoRA on one GPU or under DDP")
    hw = HardwareConfig(device=device, dtype=compute_dtype(args.dtype, device),
                        gradient_checkpointing=bool(args.gradient_checkpointing), compile=args.compile,
                        shard=args.shard, save_minutes=args.save_minutes, save_every=args.save_every)
    if preset is PRESETS["paper"] and torch.device(device).type == "cuda" and args.micro_batch_size is None \
            and args.gradient_checkpointing is None:
        gpu_bytes = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
        opt, hw = fit_to_gpu(pairs.model, longest_prompt(pairs), sampling.max_new_tokens, opt, hw, world, gpu_bytes)
    check_batch_split(opt, world, args.shard)
    if LOSSES[loss.loss].batch_coupled and opt.micro_batch_size != opt.batch_size \
            and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: --loss {loss.loss} compares the pairs of one forward with each other; with micro-batches "
              "smaller than --batch-size it sees only the micro-batch", file=sys.stderr)
    out = Path(args.out or f"runs/{Path(args.model).name}-{args.task}-{pairs.negative}-{args.loss}")
    return pairs, loss, opt, hw, out


def check_ranges(args):
    for flag, value, low in (("--n", args.n, 0), ("--n-eval", args.n_eval, 0), ("--batch-size", args.batch_size, 1),
                             ("--micro-batch-size", args.micro_batch_size, 1), ("--epochs", args.epochs, 1),
                             ("--save-every", args.save_every, 1), ("--sample-batch-size", args.sample_batch_size, 1)):
        if value is not None and value < low:
            raise MipoError(f"{flag} {value}: must be at least {low}")
    if not args.save_minutes >= 0:
        raise MipoError(f"--save-minutes {args.save_minutes}: must be at least 0 (0: no checkpoint by time)")
    if args.lora_rank < 0 or (args.lora_alpha is not None and not args.lora_alpha > 0):
        raise MipoError(f"--lora-rank {args.lora_rank} --lora-alpha {args.lora_alpha}: the rank must be at least 0 "
                        "and alpha > 0")
    if args.lr is not None and not args.lr > 0:
        raise MipoError(f"--lr {args.lr}: must be > 0")
    if not args.beta > 0:
        raise MipoError(f"--beta {args.beta}: must be > 0 (MIPO uses 0.1)")


def loss_config(args) -> LossConfig:
    loss = LossConfig(loss=args.loss, beta=args.beta, label_smoothing=args.label_smoothing,
                      reference_free=args.reference_free, rpo_alpha=args.rpo_alpha,
                      f_divergence_type=args.f_divergence_type,
                      f_alpha_divergence_coef=args.f_alpha_divergence_coef, discopop_tau=args.discopop_tau,
                      simpo_gamma=args.simpo_gamma, bco_delta=args.bco_delta,
                      temperature=args.loss_temperature)
    try:
        check_options(loss.loss, loss.beta, loss.options())
    except ValueError as e:
        raise MipoError(f"--loss {loss.loss}: {e}")
    return loss


def check_batch_split(opt: OptimConfig, world: int, sharded: bool):
    if sharded:  # shard.shard_batch: ceil(G / world) pairs per rank, padded with weight-0 copies
        slots = math.ceil(opt.batch_size / world)
        if slots % opt.micro_batch_size:
            raise MipoError(f"--micro-batch-size {opt.micro_batch_size} must divide the {slots} pair(s) each of "
                            f"{world} process(es) gets of --batch-size {opt.batch_size}")
    elif opt.batch_size % (world * opt.micro_batch_size):
        raise MipoError(f"--batch-size {opt.batch_size} must be a multiple of --micro-batch-size "
                        f"{opt.micro_batch_size} x {world} process(es)")


def fit_to_gpu(model: str, prompt_tokens: int, response_tokens: int, opt: OptimConfig, hw: HardwareConfig, world: int,
               gpu_bytes: float):
    """--preset paper on a GPU with --micro-batch-size and --gradient-checkpointing left out: the largest micro-batch
    (fewest accumulation steps) whose memory plan fits, first without gradient checkpointing, which is faster
    (shard.choose_layout, from config.json). The global batch stays --batch-size. -> (opt, hw) updated."""
    cfg = ModelConfig.from_dict(read_json(resolve_model_dir(model) / "config.json"))
    strategy = "fsdp" if hw.shard else ("ddp" if world > 1 else "single")
    layout = shard.choose_layout(cfg, world, strategy, gpu_bytes, opt.batch_size, prompt_tokens=prompt_tokens,
                                 response_tokens=response_tokens, param_bytes=2 if hw.dtype == "bfloat16" else 4,
                                 lora_rank=opt.lora_rank, lora_targets=opt.lora_targets)
    return (replace(opt, micro_batch_size=layout["micro_batch_pairs"]),
            replace(hw, gradient_checkpointing=layout["gradient_checkpointing"]))


def longest_prompt(pairs: PairsConfig) -> int:
    """The memory plan's prompt length: the longest training prompt in the model's chat template (a micro-batch is
    padded to its longest row; GSM8K's 8-shot prompt alone is about 900 tokens)."""
    model_dir = resolve_model_dir(pairs.model)
    tokenizer = Tokenizer(model_dir, ModelConfig.from_dict(read_json(model_dir / "config.json")))
    if pairs.pairs_file:
        path = Path(pairs.pairs_file)
        records = numbered_jsonl(path)
        prompts = [r["prompt"] for _, r in records if isinstance(r, dict) and isinstance(r.get("prompt"), list)]
    else:
        task = get_task(pairs.task)
        examples = load_examples(task, "train", pairs.n, pairs.data, pairs.eval_data)
        prompts = [prompt_messages(task, ex) for ex in examples]
    return max((len(tokenizer.apply_chat_template(p)) for p in prompts), default=0)


def checkpoints(hw: HardwareConfig) -> str:
    """When stage 3 writes its checkpoint, for the plan line."""
    when = [f"every {hw.save_minutes:g} min"] if hw.save_minutes else []
    when += [f"every {hw.save_every} steps"] if hw.save_every else []
    return f"checkpoint {', '.join(when) + ' and ' if when else ''}on Ctrl-C or SIGTERM"


def print_plan(pairs_cfg: PairsConfig, loss_cfg: LossConfig, opt_cfg: OptimConfig, hw: HardwareConfig, out: Path,
               world: int):
    s = resolve_sampling(pairs_cfg.sampling, pairs_cfg.model)  # every setting in force, the model's defaults included
    source = pairs_cfg.pairs_file or f"{pairs_cfg.n or 'all'} {pairs_cfg.task} prompts"
    known_n = pairs_cfg.n and not pairs_cfg.pairs_file  # a given pairs file may hold fewer pairs than --n
    steps = f"{pairs_cfg.n // opt_cfg.batch_size * opt_cfg.epochs} steps" if known_n else f"{opt_cfg.epochs} epoch(s)"
    steps = f"up to {steps}" if known_n and pairs_cfg.drop_truncated else steps
    cut = "dropped (--drop-truncated)" if pairs_cfg.drop_truncated else "kept, as the paper"
    print(f"MIPO run in {out}: {world} process(es) on {hw.device}, {hw.dtype} compute, float32 weights and AdamW\n"
          f"  1 pairs      {source} (+{pairs_cfg.n_eval} held out), --negative {pairs_cfg.negative}; {pairs_cfg.model} "
          f"samples at T={s.temperature}, top-p {s.top_p}, top-k {s.top_k or 'off'}, repetition penalty "
          f"{s.repetition_penalty:g}, up to {s.max_new_tokens} new tokens; pairs with a response cut at that limit: "
          f"{cut}\n"
          f"  2 reference  one no-grad pass of the base model over every pair, stored; no reference model after it\n"
          f"  3 DPO        --loss {loss_cfg.loss}, beta {loss_cfg.beta}: {steps} of {opt_cfg.batch_size} pairs "
          f"(micro-batch {opt_cfg.micro_batch_size}), AdamW lr {opt_cfg.lr:g} cosine to {opt_cfg.min_lr_ratio:g}x, "
          f"{checkpoints(hw)}\n"
          f"  4 final      {out / 'final'}\n"
          f"  {cpu_speedups.plan_line(hw.device)}", flush=True)
    # Whether stage 3 fits, before anything runs (shard.memory_plan: an estimate from config.json, about +-20%).
    cfg = ModelConfig.from_dict(read_json(resolve_model_dir(pairs_cfg.model) / "config.json"))
    strategy = "fsdp" if hw.shard else ("ddp" if world > 1 else "single")
    plan = shard.memory_plan(cfg, world, strategy, hw.gradient_checkpointing, opt_cfg.micro_batch_size,
                             prompt_tokens=longest_prompt(pairs_cfg), response_tokens=s.max_new_tokens,
                             param_bytes=2 if hw.dtype == "bfloat16" else 4, lora_rank=opt_cfg.lora_rank,
                             lora_targets=opt_cfg.lora_targets)
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if torch.device(hw.device).type == "cuda" else None
    print(shard.format_memory_plan(plan, gpu_bytes), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# eval.py.
# ---------------------------------------------------------------------------------------------------------------


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a model or a MIPO run on a task's held-out items, or "
                                                 "compare runs with their base.", epilog=SPEEDUPS_OFF)
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--model", default=None,
                      help="a train.py run directory, a Hugging Face model directory, a bundled name (qwen, llama, "
                           "smollm2), or a hub name (owner/name)")
    what.add_argument("--revision", default=None,
                      help="the commit (or branch, tag) of the hub model among --model / --compare (default main)")
    what.add_argument("--compare", nargs="+", default=None, metavar="BASE RUN",
                      help="BASE RUN [RUN ...]: one table of each metric for the base and each run, the paired "
                           "difference and its 95%% bootstrap interval")
    what.add_argument("--task", default=None,
                      help=f"one of: {', '.join(TASKS)} (default: the run's task, from its config.json)")
    what.add_argument("--data", default=None,
                      help="--task jsonl: the task's JSONL file (prompt, optional context, answer, id); every fifth "
                           "item is held out (default: the run's)")
    what.add_argument("--eval-data", default=None,
                      help="--task jsonl: a separate file of held-out items (default: the run's)")
    what.add_argument("--n", type=int, default=None,
                      help=f"held-out items, the same ones for every model (default {EVAL_N_DEFAULT['cpu']} on a CPU, "
                           f"{EVAL_N_DEFAULT['gpu']} on a GPU)")
    what.add_argument("--out", default=None,
                      help="where results go (default: RUN/eval for a run, runs/eval/NAME otherwise); with --compare: "
                           "where the table and chart go (default: each run's eval dir)")
    judging = parser.add_argument_group("judge and meters")
    judging.add_argument("--judge", default=DEFAULT_JUDGE,
                         help=f"judge model for personalization: bundled name or model directory, or 'none' (default "
                              f"{DEFAULT_JUDGE})")
    judging.add_argument("--judge-unparsed", choices=JUDGE_UNPARSED, default="skip",
                         help="a judge reply without an integer: skip it, as the paper does (default), or count it "
                              "as 1")
    judging.add_argument("--judge-reference", default=None, metavar="FILE",
                         help="JSONL of {id, answer}: the fixed reference answer per held-out item that every model's "
                              "answer is judged against, as the paper's win rate (default: the base model's answers)")
    judging.add_argument("--answer-fallback", choices=ANSWER_FALLBACKS, default="model",
                         help="gsm8k, an answer without a number after '####': the same model asked to extract it, as "
                              "the paper does (model, default), or this project's rules (rules)")
    judging.add_argument("--no-mi", action="store_true",
                         help="skip the pointwise-MI meters (two extra forward passes per item and model, and as many "
                              "under the base model)")
    judging.add_argument("--mi-reference", default=None,
                         help="the base model that scores every model's responses for the pmi meter (default: the "
                              "--compare base, else the model the run was trained from, else the model itself)")
    judging.add_argument("--force", action="store_true",
                         help="evaluate again even when cached results with the same settings exist")
    sampling = add_sampling_flags(parser, "sampling (defaults: the paper's, scaled down on a CPU)")
    sampling.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every model (default 0)")
    sampling.add_argument("--batch-size", type=int, default=16,
                          help="prompts per generate call and rows per MI forward")
    device = parser.add_argument_group("device")
    device.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default cuda if available)")
    device.add_argument("--dtype", choices=DTYPES, default="auto", help=f"default {AUTO_DTYPE}")
    return parser
