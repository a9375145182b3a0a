"""Settings: one dataclass per concern (pairs, loss, optimization, hardware), the two presets, and the command
lines of train.py, mipo.py and eval.py, with the sampling flags and their checks defined once. Every value a run
uses is resolved here, in one place, before anything runs; the scripts read the resulting dataclasses.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from dpo_loss import F_DIVERGENCES, LOSS_TYPES, check_options
from model_loader import ModelConfig
from plumbing.tokenizer import Tokenizer
from plumbing.hf_files import TRANSFORMERS_SAMPLING_DEFAULTS, generation_defaults
from sampler import Sampling
from tasks import NEGATIVES, TASKS, Task, default_sampling, get_task, load_examples, prompt_messages
from plumbing import shard
from plumbing.lora import TARGETS as LORA_TARGETS
from plumbing.files import MipoError, cache_dir, check_out, numbered_jsonl, read_json, write_atomically
from plumbing.model_sources import local_model, resolve_model_dir

DTYPES = ("auto", "float32", "bfloat16")
AUTO_DTYPE = "auto: bfloat16 on a GPU, and on a CPU where bf16 matrix products were measured faster, else float32"
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


# The contrastive baselines' default temperature: the official trainer (an OpenRLHF fork, openrlhf/models/loss.py)
# divides InfoNCE's log-probs by 100, hard-coded; its SAMI loss has no temperature.
LOSS_TEMPERATURE = {"infonce": 100.0, "sami": 1.0}


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
    temperature: float | None = None  # infonce / sami; None: LOSS_TEMPERATURE's value for the loss

    def __post_init__(self):
        if self.temperature is None:
            self.temperature = LOSS_TEMPERATURE.get(self.loss, 1.0)

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
    lora_rank: int = 0  # 0: every weight trained (the paper); R: low-rank adapters only (plumbing/lora.py)
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
    shard: bool = False  # FSDP2 over the torchrun processes (plumbing/shard.py)
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

# The losses that compare a pair against the other pairs of the same forward: a split of the global batch
# into micro-batches changes what they compute, so only these break gradient-accumulation equivalence.
BATCH_COUPLED_LOSSES = ("aot", "aot_unpaired", "bco_pair")

# ---------------------------------------------------------------------------------------------------------------
# Hardware: the compute dtype and the shared sampling flags.
# ---------------------------------------------------------------------------------------------------------------


def cpu_has_fast_bf16(cpuinfo_path=Path("/proc/cpuinfo")) -> bool:
    """Whether bf16 matrix products beat float32 ones on this CPU. Native bf16 instructions (AVX-512 BF16, AMX) are
    needed but not enough: some CPUs with AVX-512 BF16 and no AMX run bf16 products slower than float32 ones, others
    with the same flag run them faster (docs/performance.md). So it is measured, once per CPU model, thread count
    and torch version, and the answer kept in the cache: every later run on the machine picks the same dtype."""
    try:
        cpuinfo = cpuinfo_path.read_text()
    except OSError:
        return False
    if " avx512_bf16" not in cpuinfo and " amx_bf16" not in cpuinfo:
        return False  # emulated: always slower
    name = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    machine = f"{name.group(1) if name else '?'}|{torch.get_num_threads()} threads|torch {torch.__version__}"
    path = cache_dir() / "cpu-dtype" / f"{hashlib.sha256(machine.encode()).hexdigest()[:16]}.json"
    if path.exists():
        return read_json(path)["bfloat16_faster"]
    seconds = {str(d).removeprefix("torch."): matmul_seconds(d) for d in (torch.float32, torch.bfloat16)}
    faster = seconds["bfloat16"] < seconds["float32"]
    write_atomically(path, json.dumps({"machine": machine, "seconds_1024^3": seconds, "bfloat16_faster": faster},
                                      indent=2))
    return faster


def matmul_seconds(dtype, n=1024, repeats=5, device="cpu") -> float:
    """The best of a few n^3 matrix products in dtype (the first, which loads the kernel, not counted)."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(dtype, n=2048, device="cpu") -> float:
    """FLOP/s of the best of ten n^3 products: the peak the benchmarks measure their floors against."""
    return 2 * n**3 / matmul_seconds(dtype, n=n, repeats=10, device=device)


def compute_dtype(flag: str | None, device) -> str:
    """--dtype auto (or left out): bfloat16 where the hardware multiplies it faster than float32 (a GPU with bf16,
    a CPU where cpu_has_fast_bf16 measured it), else float32."""
    if flag not in (None, "auto"):
        return flag
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def torch_dtype(flag: str | None, device) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[compute_dtype(flag, device)]


class OneOrMany(argparse.Action):
    """A flag that takes one value, or several for a sweep (plumbing/sweep.py): one value is stored as it is."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else values)


MANY = dict(nargs="+", action=OneOrMany)  # train.py's flags that take a list: swept, or refused as a list


def add_sampling_flags(parser: argparse.ArgumentParser, title: str, many: dict | None = None):
    """The sampling flags of all three command lines; each left out takes the task's value (sampling_from_flags).
    many: train.py's, which refuses a list of them in one line (plumbing/sweep.py)."""
    many = many or {}
    g = parser.add_argument_group(title)
    g.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per response", **many)
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (0: greedy)", **many)
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass", **many)
    g.add_argument("--top-k", type=int, default=None, **many, help="top-k filter (0: off; default: the model's "
                   "generation_config.json, as transformers' generate, and transformers' 50 where it sets none)")
    g.add_argument("--repetition-penalty", type=float, default=None, **many, help="penalize the logits of the tokens a "
                   "response or its prompt holds already (1: off; default: the model's generation_config.json, 1 "
                   "where it sets none)")
    return g


def sampling_from_flags(args, base: Sampling) -> Sampling:
    """base with the sampling flags that were given; top_k and repetition_penalty left None stay the model's
    (resolve_sampling)."""
    given = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
             "top_k": args.top_k, "repetition_penalty": args.repetition_penalty}
    s = replace(base, **{k: v for k, v in given.items() if v is not None})
    if s.temperature < 0 or not 0 < s.top_p <= 1 or (s.top_k is not None and s.top_k < 0) or s.max_new_tokens < 1 \
            or (s.repetition_penalty is not None and not s.repetition_penalty > 0):
        raise MipoError(f"sampling {asdict(s)}: need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0, "
                        "--max-new-tokens >= 1, --repetition-penalty > 0")
    return s


def resolve_sampling(sampling: Sampling, model) -> Sampling:
    """sampling with the settings left to the model (None) taken from the model that samples, as transformers'
    generate takes them from its generation_config.json (plumbing/hf_files.py): model is a loaded model
    (load_model keeps its directory's defaults; a model built in memory has transformers' own) or what --model
    names. -> a Sampling whose every value is in force, what the plan prints and the pairs record."""
    if sampling.top_k is not None and sampling.repetition_penalty is not None:
        return sampling
    if isinstance(model, (str, Path)):
        defaults = generation_defaults(resolve_model_dir(model))
    else:
        defaults = getattr(model, "generation_defaults", TRANSFORMERS_SAMPLING_DEFAULTS)
    return replace(sampling, **{k: v for k, v in defaults.items() if getattr(sampling, k) is None})


# ---------------------------------------------------------------------------------------------------------------
# train.py: the command line. Flags default to None so that the preset fills in whatever was not given.
# ---------------------------------------------------------------------------------------------------------------


def flag_error(message):
    raise MipoError(f"bad flag: {message}")


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="MIPO: sample pairs from the base model, score them under it, "
                                                 "train one epoch of DPO, save a Hugging Face model. Several values "
                                                 "of a loss or optimization flag (--loss sigmoid ipo --beta 0.1 0.3) "
                                                 "train every combination from one pairs file and reference pass.")
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
                        gradient_checkpointing=bool(args.gradient_checkpointing), shard=args.shard,
                        save_minutes=args.save_minutes, save_every=args.save_every)
    if preset is PRESETS["paper"] and torch.device(device).type == "cuda" and args.micro_batch_size is None \
            and args.gradient_checkpointing is None:
        gpu_bytes = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
        opt, hw = fit_to_gpu(pairs.model, longest_prompt(pairs), sampling.max_new_tokens, opt, hw, world, gpu_bytes)
    check_batch_split(opt, world, args.shard)
    if loss.loss in BATCH_COUPLED_LOSSES and opt.micro_batch_size != opt.batch_size \
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
                                 response_tokens=response_tokens, param_bytes=2 if hw.dtype == "bfloat16" else 4)
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
          f"  4 final      {out / 'final'}", flush=True)
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
# mipo.py: pairs only.
# ---------------------------------------------------------------------------------------------------------------


def pairs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Build MIPO preference pairs: positives from x, negatives from x', "
                                                 "stored under x.")
    data = parser.add_argument_group("data")
    data.add_argument("--task", default="persona", help=f"one of: {', '.join(TASKS)} (default persona)")
    data.add_argument("--data", default=None,
                      help="--task jsonl: the JSONL file (prompt, optional context, answer, id)")
    data.add_argument("--n", type=int, default=64, help="number of training prompts, hence pairs (default 64)")
    data.add_argument("--negative", choices=NEGATIVES, default=None,
                      help="random: another prompt's response (one sampling pass, the paper's); incomplete: sampled "
                           "from x without its context or with a sentence dropped; random-resample: sampled again "
                           "from another prompt or, with a user context, from x under another user's context "
                           "(default: the task's)")
    data.add_argument("--out", default=None,
                      help="pairs file to write or resume (default runs/pairs-TASK-NEGATIVE.jsonl)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="qwen",
                       help="bundled model name (qwen, llama, smollm2), a Hugging Face directory, or a hub name "
                            "(owner/name), downloaded once with huggingface_hub")
    model.add_argument("--revision", default=None,
                       help="with a hub name: the commit (or branch, tag) to download (default main)")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device (default cuda if available)")
    model.add_argument("--dtype", choices=DTYPES, default="auto", help=f"default {AUTO_DTYPE} (as train.py)")
    sampling = add_sampling_flags(parser, "sampling (defaults: the task's, scaled down on a CPU)")
    sampling.add_argument("--seed", type=int, default=0, help="seed of the pairing and the sampling (default 0)")
    sampling.add_argument("--batch-size", type=int, default=16,
                          help="prompts per generate call, each batch with its own seed (default 16, as train.py's "
                               "--sample-batch-size: the same command samples the same pairs)")
    return parser


def task_settings(args) -> tuple[Task, str, Sampling, Path]:
    """mipo.py's flags -> (the task, the kind of negative, the sampling settings, the pairs file), checked."""
    task = get_task(args.task)
    if args.batch_size < 1:
        raise MipoError(f"--batch-size {args.batch_size}: must be at least 1")
    negative = args.negative or task.negative
    out = Path(args.out or f"runs/pairs-{task.name}-{negative}.jsonl")
    check_out(out, is_dir=False)
    return task, negative, sampling_from_flags(args, default_sampling(task, args.device)), out


# ---------------------------------------------------------------------------------------------------------------
# eval.py.
# ---------------------------------------------------------------------------------------------------------------


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a model or a MIPO run on a task's held-out items, or "
                                                 "compare runs with their base.")
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
