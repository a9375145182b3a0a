"""What the tools print and draw, which a reader of the method can skip: train.py's end-of-run summary, and
eval.py's statistics (means and paired percentile bootstrap intervals, Efron & Tibshirani 1993, ch. 13), its
comparison table (text and Markdown) and its plots (bar charts with intervals, training curves).
"""
import math
import os
import platform
import re
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import mipo
from bookkeeping import pmi_page
from bookkeeping.config import LossConfig, PairsConfig
from dpo_loss import LOSSES, preference_loss
from formats.files import RUN_METRICS, RUN_SUMMARY, read_json, read_jsonl, write_atomically
from sampler import Sampling
from tasks import Task

LN2 = math.log(2)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # every interval in every table is reproducible
CONFIDENCE = 0.95

# The metrics a table shows, in this order, when the results hold them: (key, what it measures).
METRICS = [
    ("preferences_met", "persona: share of the user's stated preferences the response follows (rule checks)"),
    ("all_met", "persona: every stated preference followed"),
    ("judge_score", "judge score 1-5, mean over the stated preferences (the paper's judge and prompt)"),
    ("judge_win", "judge win rate: the item's score >= the reference answer's score, ties win (the paper's rule)"),
    ("judge_unparsed", "share of judge replies without an integer (skipped as the paper does, or 1: --judge-unparsed)"),
    ("answer_found", "persona: the NQ answer string appears in the response (guard against degenerate answers)"),
    ("correct", "gsm8k: exact match of the answer after '####'; arc, mmlu: accuracy of the letter after "
                "'The answer is'"),
    ("exact", "movielens: predicted rating equals the real rating"),
    ("abs_error", "movielens: |predicted - real rating|, mean over parsed answers (MAE, lower is better)"),
    ("user_mean_exact", "movielens baseline: the user's mean shown rating, rounded, equals the real rating"),
    ("user_mean_abs_error", "movielens baseline: |user's mean shown rating - real rating| (lower is better)"),
    ("parsed", "an answer could be read from the response"),
    ("pmi", "pointwise MI under the BASE model, log p_base(y|x) - log p_base(y|x'), y the model's own response, nats: "
            "what MIPO claims to raise"),
    ("pmi_per_token", "pmi over the response's length in tokens, per item, then averaged: the summed MI grows with "
                      "the length of the answer, this does not"),
    ("pmi_self", "the same difference scored by the model itself (also rises when a model only grows more confident)"),
    ("length", "response length in tokens (the end-of-turn token included when the response stopped)"),
    ("truncated", "share of responses cut at --max-new-tokens (a degenerate loop always is)"),
]
METRIC_KEYS = [key for key, _ in METRICS]


# ---------------------------------------------------------------------------------------------------
# train.py: the pairs line, the step-0 check, the summary.
# ---------------------------------------------------------------------------------------------------


def starts_at_ln2(loss: LossConfig) -> bool:
    # At step 0 the policy is the reference and every log-ratio is 0, so a loss that compares with the reference
    # must then equal its value at zero log-ratios, computed here: ln 2 for sigmoid DPO and its variants. Without a
    # reference, or with RPO's NLL term, the step-0 loss depends on the data.
    if LOSSES[loss.loss].reference_free or loss.reference_free or loss.rpo_alpha is not None:
        return False
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.int64)
    at_zero = preference_loss(loss.loss, zero, zero, zero, zero, one, one, loss.beta, **loss.options())[0].item()
    return math.isclose(at_zero, LN2, rel_tol=1e-9)


def step0_message(first: dict, loss: LossConfig) -> str:
    """first: the metrics of step 1, whose loss was computed before the first update."""
    message = f"step-0 check: max |log pi - log pi_ref| = {first['step0/max_abs_logp_diff']:.2e} nats"
    if starts_at_ln2(loss):
        message += (f", rewards {first['rewards/chosen']:.1e} / {first['rewards/rejected']:.1e}, "
                    f"loss {first['loss']:.6f} (ln 2 = {LN2:.6f})")
    if first["step0/ok"]:
        return message + ": OK"
    return message + (f": MISMATCH (tolerance {first['step0/tolerance']:.2e}); the stored reference log-probs are "
                      "not this model's")


def pairs_message(stats: dict, cfg: PairsConfig) -> str:
    kept = (f"--drop-truncated: training on the {stats['trained_on']} pairs with both sides complete"
            if cfg.drop_truncated else "all kept (--drop-truncated drops them)")
    return (f"pairs: {stats['pairs']}; cut at {cfg.sampling.max_new_tokens} new tokens: chosen "
            f"{stats['chosen_truncated']:.0%}, rejected {stats['rejected_truncated']:.0%}, a pair with either side cut "
            f"{stats['either_truncated']:.0%}: {kept}")


def print_summary(summary: dict):
    print(f"\ntrained model: {summary['final']}  (model_loader.load_model, or transformers' from_pretrained)")
    last = summary["last"]
    print(f"last step ({last['step']}): loss {last['loss']:.4f}, reward accuracy {last['rewards/accuracies']:.2f}, "
          f"margin {last['rewards/margins']:.4f}")
    before, after = summary["base_eval"], summary["trained_eval"]
    if before and after:
        print(f"held-out pointwise MI under the base model, log p_base(y|x) - log p_base(y|x') with y each model's own "
              f"sample from x, over {before['pairs']} prompts: {before['pmi']:.3f} -> {after['pmi']:.3f} nats "
              f"(scored by the trained model itself: {after['pmi_self']:.3f})")
        if "pmi_per_token" in before and "pmi_per_token" in after:
            print(f"the same per token of each response: {before['pmi_per_token']:.3f} -> "
                  f"{after['pmi_per_token']:.3f} nats")
        print(f"held-out responses: {before['length']:.1f} -> {after['length']:.1f} tokens, cut at the limit "
              f"{before['truncated']:.0%} -> {after['truncated']:.0%}")
        for metric, value in before["task"].items():
            if not metric.startswith("met_"):  # persona's per-preference rates stay in summary.json
                print(f"held-out {metric}: {value:.3f} -> {after['task'].get(metric, float('nan')):.3f}")
    print("time: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in summary["timings_s"].items()))


# ---------------------------------------------------------------------------------------------------
# Statistics: means over items and percentile bootstrap intervals (Efron & Tibshirani 1993, ch. 13).
# ---------------------------------------------------------------------------------------------------


def bootstrap_ci(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of the mean: items resampled with replacement. Given per-item DIFFERENCES
    (run - base on the same item) it is the paired interval, far tighter than two separate ones."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)  # (resamples,)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def metric_values(items: list[dict], key: str) -> dict[str, float]:
    """{item id: value} of the items where the metric applies."""
    return {item["id"]: item["metrics"][key] for item in items if item["metrics"].get(key) is not None}


def summarize(items: list[dict]) -> dict:
    """{metric: {mean, ci, n}} over the items where each metric applies (n counts them)."""
    keys = [k for k in METRIC_KEYS if any(k in item["metrics"] for item in items)]
    keys += sorted({k for item in items for k in item["metrics"]} - set(keys))  # per-rule met_* and the like
    out = {}
    for key in keys:
        values = list(metric_values(items, key).values())
        if values:
            out[key] = {"mean": float(np.mean(values)), "ci": bootstrap_ci(values), "n": len(values)}
    return out


def paired(base_items: list[dict], run_items: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(base values, run values) on the items both have, matched by id, in the base's order."""
    base, run = metric_values(base_items, key), metric_values(run_items, key)
    ids = [i for i in base if i in run]
    return np.array([base[i] for i in ids]), np.array([run[i] for i in ids])


# ---------------------------------------------------------------------------------------------------
# The comparison: one table (text and Markdown) of base vs runs, and the pictures.
# ---------------------------------------------------------------------------------------------------


def short_names(specs: list[dict]) -> list[str]:
    """Table headers: a run's directory name (it names the task, negative and loss), a bundled name, or a
    model directory's name; the full paths when two would read the same."""
    names = [Path(spec["name"]).name if spec["run"] is None else spec["run"].name for spec in specs]
    return names if len(set(names)) == len(names) else [spec["name"] for spec in specs]


def machine(device: str) -> str:
    where = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return f"{where}, {platform.system()} {platform.machine()}, torch {torch.__version__}"


def compare_rows(base_items: list[dict], runs: list[list[dict]], against_base: bool = False) -> list[dict]:
    """Per metric: the base's mean and interval, and per run its mean and interval, plus the paired
    difference run - base and its interval (over the items both have). judge_win (eval.set_judge_wins) is each
    model's answer against one fixed reference answer per item, or, against_base, against the base's answers: the
    base's own rate is then 1 by construction, shown as "ref", and no difference is taken."""
    rows = []
    for key in METRIC_KEYS:
        if not any(key in item["metrics"] for items in [base_items, *runs] for item in items):
            continue  # a row even when every value is None (e.g. no judge score parsed): "-" says so
        if key == "judge_win" and against_base:
            rows.append({"metric": key, "base": None, "runs": [
                {"value": cell(list(metric_values(run_items, key).values())), "diff": None} for run_items in runs]})
            continue
        row = {"metric": key, "base": cell(list(metric_values(base_items, key).values())), "runs": []}
        for run_items in runs:
            base, run = paired(base_items, run_items, key)
            row["runs"].append({"value": cell(list(metric_values(run_items, key).values())), "diff": cell(run - base)})
        rows.append(row)
    return rows


def cell(values) -> dict | None:
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return None
    return {"mean": float(values.mean()), "ci": bootstrap_ci(values), "n": len(values)}


JUDGE_UNPARSED_NOTE = {"skip": "skipped, as the paper does", "one": "each counted as a score of 1"}


def judge_note(models: list[tuple[dict, list[dict]]], names: list[str], unparsed: str = "skip",
               reference: bool = False) -> str:
    """How many judge replies held no integer, per model, what they counted as, and what the win rate is against."""
    counts = []
    for name, (_, items) in zip(names, models):
        scores = [s for item in items for s in item.get("judge", {}).get("scores", [])]
        if scores:
            counts.append(f"{name} {sum(s is None for s in scores)}/{len(scores)}")
    if not counts:
        return ""
    against = ("--judge-reference's answers" if reference else
               f"the base model's answers ({names[0]}: ref; pass --judge-reference for a fixed reference answer)")
    return (f"judge replies without an integer ({JUDGE_UNPARSED_NOTE[unparsed]}): {', '.join(counts)}; "
            f"judge_win is against {against}")


def format_table(rows: list[dict], names: list[str], markdown: bool) -> str:
    header = ["metric", names[0]]
    for name in names[1:]:
        header += [name, f"diff [{CONFIDENCE:.0%} CI]"]
    lines = [header]
    for row in rows:
        base_is_reference = row["metric"] == "judge_win" and row["base"] is None
        line = [row["metric"], "ref" if base_is_reference else number(row["base"])]
        for run in row["runs"]:
            if base_is_reference:  # no difference against a rate of 1 by construction: the rate and its interval
                line += [interval(run["value"]), ""]
            else:
                line += [number(run["value"]), interval(run["diff"], signed=True)]
        lines.append(line)
    if markdown:
        out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines[1:]])
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    return "\n".join("  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip() for line in lines)


def number(c: dict | None) -> str:
    return "-" if c is None else f"{c['mean']:.3f}"


def interval(c: dict | None, signed: bool = False) -> str:
    """mean [low, high] (n); a '*' marks a difference whose interval excludes 0."""
    if c is None:
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    star = "*" if signed and (c["ci"][0] > 0 or c["ci"][1] < 0) else ""
    return f"{fmt.format(c['mean'])} [{fmt.format(c['ci'][0])}, {fmt.format(c['ci'][1])}]{star} (n={c['n']})"


def markdown_report(rows: list[dict], names: list[str], models, task: Task, args, settings: dict, note: str) -> str:
    """The Markdown file: the command, the settings, the table, the judge's unparsed replies, the legend."""
    used = {row["metric"] for row in rows}
    legend = [f"- `{key}`: {text}" for key, text in METRICS if key in used] + ([f"- {note}"] if note else [])
    return "\n".join([
        f"# {task.name}: {names[0]} vs {', '.join(names[1:])}", "",
        "Models: " + "; ".join(f"{name} = `{spec['model']}`" for name, (spec, _) in zip(names, models)), "",
        f"`python eval.py {' '.join(args.argv)}`", "",
        f"{settings['n']} held-out items, sampling {settings['sampling']}, seed {settings['seed']}"
        f"{f', judge {args.judge}' if 'judge_score' in used else ''}; {machine(args.device)}. "
        "Differences are run - base on the same items; intervals are "
        f"{CONFIDENCE:.0%} percentile bootstrap intervals over items ({BOOTSTRAP_RESAMPLES} resamples, seed "
        f"{BOOTSTRAP_SEED}); * marks a difference whose interval excludes 0.", "",
        format_table(rows, names, markdown=True), "", *legend, ""])


_warned_no_matplotlib = []


def pyplot():
    """matplotlib.pyplot, or None with one line on stderr: the plots are optional, the tables are not."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        if not _warned_no_matplotlib:
            print("plots skipped: matplotlib is not installed (pip install matplotlib); everything else is written",
                  file=sys.stderr)
            _warned_no_matplotlib.append(True)
        return None


def plot_comparison(rows: list[dict], names: list[str], out_png: Path) -> bool:
    """One panel per metric: a bar per model with its interval."""
    plt = pyplot()
    if plt is None:
        return False
    cols = min(3, len(rows))
    fig, axes = plt.subplots(math.ceil(len(rows) / cols), cols, figsize=(4.2 * cols, 3.2 * math.ceil(len(rows) / cols)),
                             squeeze=False)
    for ax, row in zip(axes.flat, rows):
        cells = [row["base"]] + [run["value"] for run in row["runs"]]  # one slot and one colour per model, always
        shown = [k for k, c in enumerate(cells) if c is not None]
        errors = [[cells[k]["mean"] - cells[k]["ci"][0] for k in shown],
                  [cells[k]["ci"][1] - cells[k]["mean"] for k in shown]]
        ax.bar(shown, [cells[k]["mean"] for k in shown], yerr=errors, capsize=4, color=[f"C{k}" for k in shown])
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        lower = " (lower is better)" if row["metric"].endswith("abs_error") else ""
        ax.set_title(row["metric"] + lower, fontsize=10)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlim(-0.6, len(names) - 0.4)
        if not shown:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"mean and {CONFIDENCE:.0%} bootstrap interval over items", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_png)
    plt.close(fig)
    return True


# The panels of the training curves: (title, the metrics.jsonl keys drawn in it); the MI meter comes last.
CURVE_PANELS = [("loss", ["loss"]), ("reward accuracy", ["rewards/accuracies"]), ("reward margin", ["rewards/margins"]),
                ("rewards", ["rewards/chosen", "rewards/rejected"]),
                ("log-probs (summed)", ["logps/chosen", "logps/rejected"]),
                ("gradient norm (before clipping)", ["grad_norm"]), ("learning rate", ["lr"])]
LINE_STYLES = ("-", "--", ":")


def plot_training_curves(runs, out_png: Path, names: list[str] | None = None) -> bool:
    """Loss, reward accuracy, margin, rewards, chosen and rejected log-probs, gradient norm, learning rate and the MI
    meter against the step: train.py's RUN/curves.png, eval.py's RUN/eval/curves.png, and a sweep's, every variant
    on the same axes (runs: one run directory or several, names their legend)."""
    runs = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    names = names or [r.name for r in runs]
    histories = [[r for r in read_jsonl(run / RUN_METRICS) if isinstance(r, dict)] if (run / RUN_METRICS).is_file()
                 else [] for run in runs]
    if not any(histories):
        return False
    plt = pyplot()
    if plt is None:
        return False
    from matplotlib.lines import Line2D

    many = len(runs) > 1
    fig, axes = plt.subplots(2, 4, figsize=(17, 6.8))
    meter_ax = axes.flat[len(CURVE_PANELS)]
    right = None
    for k, (run, records) in enumerate(zip(runs, histories)):
        if not records:
            continue
        colour = f"C{k}" if many else None
        for ax, (title, keys) in zip(axes.flat, CURVE_PANELS):
            for style, key in zip(LINE_STYLES, keys):
                points = [(r.get("step", i), r[key]) for i, r in enumerate(records)
                          if isinstance(r.get(key), (int, float))]
                if points:
                    ax.plot(*zip(*points), label=key, color=colour, linestyle=style if many else "-",
                            marker="." if len(points) < 30 else None)
        # The meter: any pmi logged per step, else the held-out meter before and after training (summary.json).
        pmi_keys = sorted({key for r in records for key in r if "pmi" in key})
        for style, key in zip(LINE_STYLES, pmi_keys):
            points = [(r.get("step", i), r[key]) for i, r in enumerate(records) if isinstance(r.get(key), (int, float))]
            meter_ax.plot(*zip(*points), label=key, color=colour, linestyle=style)
        meter = read_json(run / RUN_SUMMARY) if (run / RUN_SUMMARY).is_file() else {}
        ends = ((0, "base_eval"), (records[-1].get("step", len(records)), "trained_eval"))
        before_after = {metric: [(step, meter[key][metric]) for step, key in ends
                                 if isinstance(meter.get(key), dict)
                                 and isinstance(meter[key].get(metric), (int, float))]
                        for metric in ("pmi", "pmi_per_token")}
        if not pmi_keys and before_after["pmi"]:
            meter_ax.plot(*zip(*before_after["pmi"]), marker="o", color=colour,
                          label="held-out pmi under the base model, before -> after")
            if before_after["pmi_per_token"]:  # nats per token: its own axis, on the right
                right = right or meter_ax.twinx()
                right.plot(*zip(*before_after["pmi_per_token"]), marker="s", linestyle="--", color=colour or "C1",
                           label="the same per token")
    for ax, (title, keys) in zip(axes.flat, CURVE_PANELS + [("MI meter (nats)", [])]):
        if not ax.lines:
            ax.text(0.5, 0.5, f"not in {RUN_METRICS}", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif many:  # the colour is the run (the figure's legend), the line style the key
            styles = sorted({(line.get_linestyle(), line.get_label()) for line in ax.lines})
            if len(styles) > 1:
                ax.legend(handles=[Line2D([], [], color="black", linestyle=style, label=label)
                                   for style, label in styles], fontsize=7)
        else:
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
    axes.flat[CURVE_PANELS.index(("learning rate", ["lr"]))].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if right is not None:
        right.set_ylabel("nats per token", fontsize=8)
        if not many:
            right.legend(fontsize=7, loc="lower right")
    if many:
        fig.legend(handles=[Line2D([], [], color=f"C{k}", label=name) for k, name in enumerate(names)],
                   loc="lower center", ncol=min(4, len(names)), fontsize=8)
        fig.suptitle(f"{out_png.parent}: {len(runs)} runs", fontsize=10)
        fig.tight_layout(rect=(0, 0.04 * math.ceil(len(names) / 4), 1, 1))
    else:
        fig.suptitle(str(runs[0]), fontsize=10)
        fig.tight_layout()
    save_figure(fig, out_png)
    plt.close(fig)
    return True


def save_figure(fig, out_png: Path) -> None:
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out_png)


# ---------------------------------------------------------------------------------------------------------------
# eval.py's output: one model's summary, or the --compare table with its Markdown and chart.
# ---------------------------------------------------------------------------------------------------------------


def print_one(model: tuple[dict, list[dict]], task: Task, names: list[str], args, fixed_reference: bool) -> None:
    """One model: its summary (with its judge win rate against --judge-reference's answers when given), and its
    training curves when it is a run."""
    spec, items = model
    print(f"{spec['name']} on {task.name}: {len(items)} items -> {spec['eval_dir']}")
    for key, c in summarize(items).items():
        print(f"  {key:<22} {interval(c)}")
    note = judge_note([model], names, args.judge_unparsed, fixed_reference)
    if note:
        print(f"  {note}")
    if spec["run"] is not None and plot_training_curves(spec["run"], spec["eval_dir"] / "curves.png"):
        print(f"  curves: {spec['eval_dir'] / 'curves.png'}")


def write_comparison(models: list[tuple[dict, list[dict]]], task: Task, examples, args, settings: dict,
                     fixed_reference: bool) -> None:
    """--compare: the table on stdout, and as Markdown with a chart in each run's eval dir (or --out). fixed_reference:
    judge_win is against --judge-reference's answers (False: against the base model's answers)."""
    specs = [spec for spec, _ in models]
    names = short_names(specs)
    in_force = mipo.resolve_sampling(Sampling(**settings["sampling"]), specs[0]["model"])  # as the base sampled
    settings = {**settings, "sampling": asdict(in_force)}
    rows = compare_rows(models[0][1], [items for _, items in models[1:]], against_base=not fixed_reference)
    print(f"{task.name}: {len(examples)} held-out items; diff = run - base on the same items, "
          f"{CONFIDENCE:.0%} paired bootstrap interval; * excludes 0")
    print(format_table(rows, names, markdown=False))
    note = judge_note(models, names, args.judge_unparsed, fixed_reference)
    if note:
        print(note)
    out_dirs = [Path(args.out)] if args.out else [spec["eval_dir"] for spec in specs[1:]]
    for out_dir in out_dirs:
        markdown = markdown_report(rows, names, models, task, args, settings, note)
        write_atomically(out_dir / f"compare-{task.name}.md", markdown)
        plot_comparison(rows, names, out_dir / f"compare-{task.name}.png")
        print(f"table: {out_dir / f'compare-{task.name}.md'}", file=sys.stderr)
    prompts = pmi_page.meter_prompts(task, examples)
    base_rows = pmi_page.read_token_rows(pmi_page.tokens_file(specs[0]["eval_dir"], task.name))
    for spec, name, (_, items) in zip(specs[1:], names[1:], models[1:]):
        page = (Path(args.out) / f"pmi-{task.name}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.html" if args.out
                else spec["eval_dir"] / f"pmi-{task.name}.html")
        pmi_page.write_compare_page(page, [names[0], name], prompts, [
            (models[0][1], base_rows), (items, pmi_page.read_token_rows(pmi_page.tokens_file(spec["eval_dir"],
                                                                                             task.name)))])
        print(f"page: {page}", file=sys.stderr)
    for spec in specs:
        if spec["run"] is not None and plot_training_curves(spec["run"], spec["eval_dir"] / "curves.png"):
            print(f"curves: {spec['eval_dir'] / 'curves.png'}", file=sys.stderr)
