"""A sweep, which a reader of the method can skip: one train.py command with several values of settings that act
after the reference pass trains every combination of them, each in a run directory of its own laid out as a single
run's, from one pairs file and one reference pass computed once in SWEEP/shared (one pass per kind: infonce and sami
also score the responses under x'). A sweep resumes like a single run: a finished variant is skipped, a killed one
resumes. It ends with the held-out meter of every variant against the base model, with paired bootstrap intervals.

    python train.py --model qwen --loss sigmoid ipo hinge --beta 0.1 0.3     # six variants in runs/qwen-...-sweep
"""
import copy
import itertools
import json
import sys
from pathlib import Path

from bookkeeping import report
from formats.files import RUN_SUMMARY, MipoError, read_json, write_atomically
from tasks import get_task

# Settings that act after the reference pass: a list of values is swept (flag -> argparse dest).
SWEPT = {"--loss": "loss", "--beta": "beta", "--label-smoothing": "label_smoothing", "--rpo-alpha": "rpo_alpha",
         "--f-divergence-type": "f_divergence_type", "--f-alpha-divergence-coef": "f_alpha_divergence_coef",
         "--discopop-tau": "discopop_tau", "--simpo-gamma": "simpo_gamma", "--bco-delta": "bco_delta",
         "--loss-temperature": "loss_temperature", "--lr": "lr", "--epochs": "epochs", "--lora-rank": "lora_rank",
         "--lora-alpha": "lora_alpha"}
# Settings that change the pairs or the reference pass: a list of them is refused.
FIXED = {"--model": "model", "--task": "task", "--negative": "negative", "--n": "n", "--seed": "seed",
         "--batch-size": "batch_size", "--micro-batch-size": "micro_batch_size", "--max-new-tokens": "max_new_tokens",
         "--temperature": "temperature", "--top-p": "top_p", "--top-k": "top_k",
         "--repetition-penalty": "repetition_penalty"}
SWEEP_FILE = "sweep.json"  # SWEEP/sweep.json: the variants, in order; eval.py --compare BASE SWEEP reads it
SHARED = "shared"  # SWEEP/shared: the pairs, the held-out pairs, the base model's meter, the reference log-probs


def variants(args) -> list:
    """[args] for a single run; for a sweep one copy of args per combination, each with its own --out, in order."""
    for flag, dest in FIXED.items():
        if isinstance(getattr(args, dest), list):
            values = " ".join(str(v) for v in getattr(args, dest))
            raise MipoError(f"{flag} {values}: a list of a setting that changes the pairs or the reference pass; "
                            "run one command per value")
    swept = {flag: getattr(args, dest) for flag, dest in SWEPT.items() if isinstance(getattr(args, dest), list)}
    if not swept:
        return [args]
    for flag, values in swept.items():
        if len(set(values)) < len(values):
            raise MipoError(f"{flag} {' '.join(map(str, values))}: a value is listed twice")
    negative = args.negative or get_task(args.task).negative
    sweep_dir = Path(args.out or f"runs/{Path(args.model).name}-{args.task}-{negative}-sweep")
    out = []
    for combo in itertools.product(*swept.values()):
        variant = copy.copy(args)
        for flag, value in zip(swept, combo):
            setattr(variant, SWEPT[flag], value)
        variant.out = str(sweep_dir / "_".join(f"{flag[2:]}-{value}" for flag, value in zip(swept, combo)))
        variant.shared = str(sweep_dir / SHARED)
        out.append(variant)
    return out


def start(variants: list) -> None:
    """Rank 0, once every variant's settings have been checked: SWEEP/sweep.json names the variants."""
    sweep_dir = Path(variants[0].out).parent
    names = [Path(v.out).name for v in variants]
    path = sweep_dir / SWEEP_FILE
    recorded = read_json(path).get("variants", []) if path.exists() else names
    if recorded != names:
        raise MipoError(f"{path}: holds another sweep ({', '.join(recorded)}); pass another --out, or the same lists "
                        "to resume it")
    write_atomically(path, json.dumps({"variants": names}, indent=2) + "\n")


def variant_dirs(sweep_dir: Path) -> list[Path] | None:
    """The run directories of a sweep directory, in order; None when sweep_dir is not one."""
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        return None
    dirs = [Path(sweep_dir) / name for name in read_json(path)["variants"]]
    if not all(d.is_dir() for d in dirs):
        raise MipoError(f"{path}: names variants that have not run yet; run the sweep's train.py command first")
    return dirs


def print_table(variants: list) -> None:
    """The held-out meter of every variant against the base model on the same held-out prompts: eval.py --compare's
    table, with paired bootstrap intervals, on stdout and as SWEEP/compare-held-out.md and .png."""
    sweep_dir = Path(variants[0].out).parent
    summaries = [read_json(Path(v.out) / RUN_SUMMARY) for v in variants]
    if not summaries[0].get("base_eval") or "items" not in summaries[0]["base_eval"]:
        return  # no held-out prompts (--n-eval 0)
    base = summaries[0]["base_eval"]["items"]
    names = ["base"] + [Path(v.out).name for v in variants]
    rows = report.compare_rows(base, [s["trained_eval"]["items"] for s in summaries])
    title = (f"held-out meter: {len(base)} prompts; each model's own samples scored by the base model; "
             f"diff = variant - base on the same prompts, {report.CONFIDENCE:.0%} paired bootstrap interval; "
             "* excludes 0")
    print(title)
    print(report.format_table(rows, names, markdown=False))
    write_atomically(sweep_dir / "compare-held-out.md",
                     f"{title}\n\n{report.format_table(rows, names, markdown=True)}\n")
    if report.plot_comparison(rows, names, sweep_dir / "compare-held-out.png"):
        print(f"table: {sweep_dir / 'compare-held-out.md'}, chart: {sweep_dir / 'compare-held-out.png'}",
              file=sys.stderr)


def plot_curves(variants: list) -> None:
    """SWEEP/curves.png: the training curves of every variant on one set of axes per panel."""
    sweep_dir = Path(variants[0].out).parent
    names = [Path(v.out).name for v in variants]
    if report.plot_training_curves([Path(v.out) for v in variants], sweep_dir / "curves.png", names):
        print(f"curves: {sweep_dir / 'curves.png'}", file=sys.stderr)
