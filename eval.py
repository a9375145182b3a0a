"""Evaluation: does a MIPO run beat its base instruct model on the paper's own measures, and by how much?
It never trains or changes a model and does not reuse the training pairs: every response it scores is sampled here.

The paper (Nam, Li, Jaques, arXiv 2603.19294) reports gains over the base instruct model: 3-40% on
personalization, 1-18% on math and multiple choice. This file measures the same things the same way:
  persona    rate of satisfied stated preferences (rule checks from mipo.py), the paper's judge protocol
             (a judge model scores each response 1-5 per stated preference; a response wins when its
             score is at least the reference's), and whether the NQ answer appears (a degeneracy guard);
  movielens  mean absolute error and exact-rating accuracy, next to the user's own mean rating;
  gsm8k      exact match of the answer after '####' (mipo.extract_number, with its fallbacks);
  arc, mmlu  accuracy of the letter after 'The answer is' (mipo.extract_letter);
  every task the pointwise MI meter: log p(y|x) - log p(y|x') of the model's own response y under the BASE
             model, x' the task's negative prompt (the MIPO paper): what one epoch of DPO on MIPO pairs claims to
             raise (pmi); the same scored by the model itself (pmi_self), the length and the share cut short.
Each model's per-item results are cached next to it (RUN/eval/TASK.jsonl), so `--compare` evaluates only
what is missing and pairs items by id for a bootstrap interval of every difference.

    python eval.py --model qwen --task persona --n 50
    python eval.py --compare qwen runs/persona-qwen runs/persona-qwen-ipo
"""
import argparse
import gc
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

import mipo
import sampler
from mipo import Sampling, Task, get_task, load_examples, prompt_messages
from model_loader import MipoError, cpu_has_fast_bf16, is_hub_name

# The layout of a train.py run directory: the one place eval.py knows it.
RUN_FINAL = "final"  # the trained policy, a Hugging Face model directory
RUN_METRICS = "metrics.jsonl"  # one JSON dict per optimizer step (loss, rewards/*, logps/*, ...)
RUN_CONFIG = "config.json"  # the run's settings; eval reads pairs.task and pairs.data from it
RUN_SUMMARY = "summary.json"  # base_eval / trained_eval: train.py's held-out MI meter before and after
EVAL_SUBDIR = "eval"  # RUN/eval/TASK.jsonl, TASK.summary.json, compare-TASK.md/.png, curves.png
OTHER_MODELS_DIR = Path("runs/eval")  # results of a bundled model or a plain model directory: runs/eval/NAME

N_DEFAULT = {"cpu": 50, "gpu": 200}  # held-out items; 200 is the whole persona / gsm8k held-out set
DEFAULT_JUDGE = "qwen"  # the largest bundled model; on a GPU pass a larger local checkpoint
JUDGE_MAX_NEW_TOKENS = 48  # "Score: N" and a sentence; the judge decodes greedily
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # every interval in every table is reproducible
CONFIDENCE = 0.95
MI_SEED = mipo.DATA_SEED  # fixes x' of the MI meter, so every model is measured against the same other prompts

# The metrics a table shows, in this order, when the results hold them: (key, what it measures).
METRICS = [
    ("preferences_met", "persona: share of the user's stated preferences the response follows (rule checks)"),
    ("all_met", "persona: every stated preference followed"),
    ("judge_score", "judge score 1-5, mean over the stated preferences (the paper's judge prompt)"),
    ("judge_win", "judge win rate against the base model's response: score >= base's (the paper's protocol)"),
    ("judge_unparsed", "share of judge replies with no readable score 1-5, each counted as a score of 1"),
    ("answer_found", "persona: the NQ answer string appears in the response (guard against degenerate answers)"),
    ("correct", "gsm8k: exact match of the answer after '####'; arc, mmlu: accuracy of the letter after 'The answer is'"),
    ("exact", "movielens: predicted rating equals the real rating"),
    ("abs_error", "movielens: |predicted - real rating|, mean over parsed answers (MAE, lower is better)"),
    ("user_mean_exact", "movielens baseline: the user's mean shown rating, rounded, equals the real rating"),
    ("user_mean_abs_error", "movielens baseline: |user's mean shown rating - real rating| (lower is better)"),
    ("parsed", "an answer could be read from the response"),
    ("pmi", "pointwise MI under the BASE model, log p_base(y|x) - log p_base(y|x'), y the model's own response, nats: "
            "what MIPO claims to raise"),
    ("pmi_self", "the same difference scored by the model itself (also rises when a model only grows more confident)"),
    ("length", "response length in tokens (the end-of-turn token included when the response stopped)"),
    ("truncated", "share of responses cut at --max-new-tokens (a degenerate loop always is)"),
]
METRIC_KEYS = [key for key, _ in METRICS]

# The judge prompt. The paper's exact wording was not available to us (its appendix could not be read
# here); this follows its protocol: one stated preference at a time, a 1-5 score, the user's question and
# the response shown verbatim, and an answer format a parser can read.
JUDGE_PROMPT = """You are judging how well an AI assistant's response follows one preference that its user stated.

The user's question:
{question}

The user's stated preference:
{preference}

The assistant's response:
<response>
{response}
</response>

On a scale of 1 to 5, how well does the response follow this preference? 1 = ignores or contradicts it, \
2 = mostly ignores it, 3 = partly follows it, 4 = mostly follows it, 5 = follows it fully. Judge only this \
preference, not whether the answer is correct. Reply with "Score: N" on the first line, then one sentence \
explaining why."""


# ---------------------------------------------------------------------------------------------------
# Per-item metrics: mipo.py's checkers plus what the evaluation adds.
# ---------------------------------------------------------------------------------------------------


def user_mean_rating(ex: mipo.Example) -> float:
    """The mean of the past ratings a movielens prompt shows ("- Title (genres): 4" lines)."""
    ratings = [int(r) for r in re.findall(r"^- .*: ([1-5])$", ex.context, re.M)]
    if not ratings:
        raise MipoError(f"movielens item {ex.id}: its context shows no past ratings")
    return sum(ratings) / len(ratings)


def score_item(task: Task, ex: mipo.Example, response: str) -> dict:
    """{metric: value or None} for one response; None where the metric does not apply (e.g. no rating parsed)."""
    metrics = dict(task.score(ex, response))
    if task.name == "persona":
        metrics["answer_found"] = float(mipo.mentions_answer(response, ex.meta["answers"]))
    if task.name == "movielens":
        metrics.setdefault("abs_error", None)  # no rating parsed: not in the MAE, counted in `parsed`
        truth, mean = float(ex.answer), user_mean_rating(ex)
        metrics["user_mean_exact"] = float(mipo.nearest_rating(mean) == truth)  # rounded as the model's rating
        metrics["user_mean_abs_error"] = abs(mean - truth)
    return metrics


def judge_preferences(task: Task, ex: mipo.Example) -> list[str]:
    """The stated preferences the judge scores one at a time; [] where the task has none."""
    if task.name == "persona":
        return [mipo.PREFERENCE_BY_ID[rule][2] for rule in ex.meta["rules"]]
    if task.name == "jsonl" and ex.context:  # the user's own context: one preference per line
        return [line.strip().lstrip("-*\u2022 ").strip() for line in ex.context.splitlines() if line.strip()]
    return []


def parse_judge_score(reply: str) -> int | None:
    """The integer 1-5 after 'Score:' (or 'Rating:'), else the first standalone integer 1-5 in the reply.
    A number out of range after 'Score:', or no number 1-5 at all, is None: counted, never guessed."""
    keyed = re.search(r"\b(?:score|rating)\b\s*(?:is|of)?\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)", reply, re.I)
    if keyed:
        value = float(keyed.group(1))
        return int(value) if value.is_integer() and 1 <= value <= 5 else None
    for number in re.findall(r"(?<![\w.-])(\d+(?:\.\d+)?)(?![\w]|\.\d)", reply):
        if number in ("1", "2", "3", "4", "5"):
            return int(number)
    return None


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
# Evaluating one model: sample a response per held-out item, score it, meter the MI, judge it.
# ---------------------------------------------------------------------------------------------------


def check_fits(model, prompts: list[list[int]], max_new_tokens: int, what: str) -> None:
    limit = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > limit:
        raise MipoError(f"{what}: a prompt of {longest} tokens + --max-new-tokens {max_new_tokens} exceeds the model's "
                        f"context window of {limit} tokens; lower --max-new-tokens")


def generate_texts(model, tokenizer, prompts, sampling: Sampling, seed: int, batch_size: int, progress: bool):
    """(text, stopped) per prompt; the stop token is cut from the text, as in the pairs file."""
    completions = sampler.generate(model, prompts, sampling.max_new_tokens, temperature=sampling.temperature,
                                   top_p=sampling.top_p, top_k=sampling.top_k, stop_token_ids=tokenizer.stop_token_ids,
                                   seed=seed, batch_size=batch_size, progress=progress)
    return [mipo.response_text(tokenizer, tokens) for tokens in completions]


def meter_rows(task: Task, examples: list[mipo.Example], items: list[dict]) -> list[tuple]:
    """(x, x', y, stopped) per item, y the model's own response and x' the task's own negative prompt
    (mipo.plan_negatives), fixed by MI_SEED and the items alone, so that every model is metered against the same x'."""
    negatives = mipo.plan_negatives(task, examples, task.negative, MI_SEED)
    return [(prompt_messages(task, ex), prompt_messages(task, x_prime), item["response"], item["stopped"])
            for ex, (x_prime, _, _), item in zip(examples, negatives, items)]


def can_meter(task: Task, examples: list) -> bool:
    return not task.negative.startswith("random") or len(examples) >= 2  # a random x' needs another item


def evaluate(model, tokenizer, task: Task, examples: list[mipo.Example], sampling: Sampling, seed: int,
             batch_size: int = 16, mi: bool = True, progress: bool = True) -> list[dict]:
    """One record per item: {id, response, stopped, metrics}. With mi, the model's own pointwise MI of its response
    (pmi_self) and the response's length in tokens; the base model's (pmi) is meter_all's."""
    prompts = [tokenizer.apply_chat_template(prompt_messages(task, ex)) for ex in examples]
    check_fits(model, prompts, sampling.max_new_tokens, f"{task.name} prompts")
    items = []
    for ex, (response, stopped) in zip(examples, generate_texts(model, tokenizer, prompts, sampling, seed, batch_size, progress)):
        items.append({"id": ex.id, "response": response, "stopped": stopped,
                      "metrics": {**score_item(task, ex, response), "truncated": float(not stopped)}})
    if mi and can_meter(task, examples):
        values, lengths = mipo.pointwise_mi(model, tokenizer, meter_rows(task, examples, items), batch_size, progress=True)
        for item, value, length in zip(items, values, lengths):
            item["metrics"].update(pmi_self=value, length=float(length))
    return items


def judge(judge_model, judge_tokenizer, judge_name: str, task: Task, examples: list[mipo.Example], items: list[dict],
          batch_size: int = 16, progress: bool = True) -> None:
    """The paper's personalization protocol: the judge scores each response 1-5 for each stated preference.
    Fills item["judge"] (scores, None where a reply held none; raw replies) and the metric judge_score (their mean,
    an unreadable reply counted as 1)."""
    requests = [(k, preference) for k, ex in enumerate(examples) for preference in judge_preferences(task, ex)]
    prompts = [judge_tokenizer.apply_chat_template([{"role": "user", "content": JUDGE_PROMPT.format(
        question=examples[k].question, preference=preference, response=items[k]["response"])}]) for k, preference in requests]
    if not prompts:
        return
    check_fits(judge_model, prompts, JUDGE_MAX_NEW_TOKENS, f"judge {judge_name}")
    replies = generate_texts(judge_model, judge_tokenizer, prompts, Sampling(0.0, 1.0, 0, JUDGE_MAX_NEW_TOKENS), 0,
                             batch_size, progress)
    for item in items:
        item["judge"] = {"model": judge_name, "scores": [], "replies": []}
    for (k, _), (reply, _) in zip(requests, replies):
        items[k]["judge"]["scores"].append(parse_judge_score(reply))
        items[k]["judge"]["replies"].append(reply)
    for item in items:
        # A reply with no readable score counts as the lowest score, 1 (a loss against the reference), not as a
        # missing item: a judge that fails on the hard responses must not make them vanish from the comparison.
        scores = [1 if s is None else s for s in item["judge"]["scores"]]
        item["metrics"]["judge_score"] = sum(scores) / len(scores) if scores else None
        item["metrics"]["judge_unparsed"] = sum(s is None for s in item["judge"]["scores"]) / len(scores) if scores else None


# ---------------------------------------------------------------------------------------------------
# Where results live: a run directory, a model directory or a bundled name -> the model and its eval dir.
# ---------------------------------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    return (path / RUN_FINAL).is_dir() or (path / RUN_METRICS).is_file()


def resolve(name_or_path: str, revision: str | None = None) -> dict:
    """{name, model (what load_model takes), run (the run directory or None), eval_dir}. A hub name (owner/name) is
    downloaded at revision and then treated as the local directory it is in."""
    from gguf_convert import BUNDLED, BUNDLED_ALIASES
    from model_loader import resolve_model_dir

    path = resolve_model_dir(name_or_path, revision) if is_hub_name(name_or_path) else Path(name_or_path)
    if path.name == RUN_FINAL and is_run_dir(path.parent):  # RUN/final: the run's own results
        path = path.parent
    if path.is_dir() and is_run_dir(path):
        if not (path / RUN_FINAL / "config.json").is_file():
            raise MipoError(f"{path}: run directory without a trained model ({RUN_FINAL}/config.json is missing); "
                            "let train.py finish, or pass a model directory")
        return {"name": str(name_or_path), "model": str(path / RUN_FINAL), "run": path, "eval_dir": path / EVAL_SUBDIR}
    if str(name_or_path) in {*BUNDLED, *BUNDLED_ALIASES}:
        return {"name": str(name_or_path), "model": str(name_or_path), "run": None, "eval_dir": OTHER_MODELS_DIR / str(name_or_path)}
    if not path.exists():
        raise MipoError(f"{path}: no such run directory or model (a train.py run directory, a Hugging Face model "
                        f"directory, or a bundled name: {', '.join([*BUNDLED, *BUNDLED_ALIASES])})")
    if not (path / "config.json").is_file():
        raise MipoError(f"{path}: neither a train.py run directory (no {RUN_FINAL}/ or {RUN_METRICS}) "
                        "nor a Hugging Face model directory (no config.json)")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(path.resolve()).strip("/"))
    return {"name": str(name_or_path), "model": str(path), "run": None, "eval_dir": OTHER_MODELS_DIR / slug}


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MipoError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})")
    return data if isinstance(data, dict) else {}


def run_data_settings(run: Path) -> dict:
    """{task, data, eval_data} of a run: train.py keeps them in the "pairs" section of its config.json."""
    config = read_json(run / RUN_CONFIG)
    pairs = config.get("pairs") if isinstance(config.get("pairs"), dict) else config
    return {"task": pairs.get("task"), "data": pairs.get("data"), "eval_data": pairs.get("eval_data")}


def fingerprint(model_arg: str) -> list:
    """Name, size and modification time of each weight file: a retrained run never reuses stale results."""
    from model_loader import resolve_model_dir, weight_files

    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in weight_files(resolve_model_dir(model_arg))]


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: an interrupted evaluation never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_results(eval_dir: Path, task: Task, items: list[dict], summary: dict) -> None:
    write_atomically(eval_dir / f"{task.name}.jsonl", "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    write_atomically(eval_dir / f"{task.name}.summary.json", json.dumps(summary, indent=2) + "\n")


def load_results(eval_dir: Path, task: Task, settings: dict, ids: list[str]) -> list[dict] | None:
    """The cached items when they were made with exactly these settings for exactly these items, else None."""
    summary_path, items_path = eval_dir / f"{task.name}.summary.json", eval_dir / f"{task.name}.jsonl"
    if not (summary_path.is_file() and items_path.is_file()):
        return None
    try:
        summary = json.loads(summary_path.read_text())
        items = [json.loads(line) for line in items_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError:
        return None  # a damaged cache is evaluated again, not trusted
    if summary.get("settings") != settings or [item.get("id") for item in items] != ids:
        return None
    return items


def results_for(spec: dict, task: Task, examples, args, settings: dict) -> list[dict]:
    """Cached results of one model, or a fresh evaluation saved to its eval dir."""
    settings = {**settings, "model_files": fingerprint(spec["model"])}
    ids = [ex.id for ex in examples]
    items = None if args.force else load_results(spec["eval_dir"], task, settings, ids)
    if items is not None:
        print(f"{spec['name']}: {task.name} results from {spec['eval_dir']}", file=sys.stderr)
        return items
    from model_loader import load_model

    model, tokenizer = load_model(spec["model"], args.device, args.torch_dtype)
    print(f"{spec['name']}: evaluating {len(examples)} {task.name} items, {settings['sampling']}", file=sys.stderr)
    start = time.time()
    items = evaluate(model, tokenizer, task, examples, Sampling(**settings["sampling"]), args.seed, args.batch_size,
                     not args.no_mi, progress=True)
    del model
    gc.collect()
    save_results(spec["eval_dir"], task, items, {"model": spec["name"], "model_dir": spec["model"], "task": task.name,
                                                 "settings": settings, "seconds": round(time.time() - start, 1),
                                                 "machine": machine(args.device), "metrics": summarize(items)})
    return items


def judge_all(models: list[tuple[dict, list[dict]]], task: Task, examples, args) -> None:
    """Judge every model's responses that this judge has not scored yet (one judge load for all)."""
    if args.judge == "none" or not any(judge_preferences(task, ex) for ex in examples):
        return
    todo = [(spec, items) for spec, items in models if any(item.get("judge", {}).get("model") != args.judge for item in items)]
    if not todo:
        return
    from model_loader import load_model

    judge_model, judge_tokenizer = load_model(resolve(args.judge)["model"], args.device, args.torch_dtype)
    for spec, items in todo:
        print(f"{spec['name']}: judging {len(items)} responses with {args.judge}", file=sys.stderr)
        judge(judge_model, judge_tokenizer, args.judge, task, examples, items, args.batch_size)
        summary_path = spec["eval_dir"] / f"{task.name}.summary.json"
        summary = json.loads(summary_path.read_text())
        scores = [s for item in items for s in item["judge"]["scores"]]
        summary.update(metrics=summarize(items), judge={"model": args.judge, "scored": len(scores),
                                                        "unparsed": sum(s is None for s in scores)})
        save_results(spec["eval_dir"], task, items, summary)
    del judge_model
    gc.collect()


def meter_all(models: list[tuple[dict, list[dict]]], task: Task, examples, args) -> None:
    """pmi: every model's responses scored by the reference (base) model, loaded once, for the models it has not
    scored yet. MIPO's claim is that training raises this number: the base model's pointwise MI of the trained
    model's responses."""
    if args.no_mi or not can_meter(task, examples):
        return
    reference = {"model": args.mi_reference["name"], "files": fingerprint(args.mi_reference["model"])}
    todo = [(spec, items) for spec, items in models if any(item.get("mi_reference") != reference for item in items)]
    if not todo:
        return
    from model_loader import load_model

    model, tokenizer = load_model(args.mi_reference["model"], args.device, args.torch_dtype)
    for spec, items in todo:
        print(f"{spec['name']}: pointwise MI of {len(items)} responses under {args.mi_reference['name']}", file=sys.stderr)
        values, _ = mipo.pointwise_mi(model, tokenizer, meter_rows(task, examples, items), args.batch_size, progress=True)
        for item, value in zip(items, values):
            item["metrics"]["pmi"], item["mi_reference"] = value, reference
        summary_path = spec["eval_dir"] / f"{task.name}.summary.json"
        summary = json.loads(summary_path.read_text())
        summary.update(metrics=summarize(items), mi_reference=reference)
        save_results(spec["eval_dir"], task, items, summary)
    del model
    gc.collect()


def mi_reference(args, specs: list[dict]) -> dict:
    """The base model whose pointwise MI is the headline meter: --mi-reference, else the base of --compare, else
    the model a run was trained from (its config.json), else the evaluated model itself."""
    if args.mi_reference:
        return resolve(args.mi_reference)
    if args.compare is not None:
        return specs[0]
    run = specs[0]["run"]
    base = read_json(run / RUN_CONFIG).get("pairs", {}).get("model") if run is not None else None
    return resolve(base) if base else specs[0]


def short_names(specs: list[dict]) -> list[str]:
    """Table headers: a run's directory name (it names the task, negative and loss), a bundled name, or a
    model directory's name; the full paths when two would read the same."""
    names = [Path(spec["name"]).name if spec["run"] is None else spec["run"].name for spec in specs]
    return names if len(set(names)) == len(names) else [spec["name"] for spec in specs]


def machine(device: str) -> str:
    where = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return f"{where}, {platform.system()} {platform.machine()}, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------------
# The comparison: one table (text and Markdown) of base vs runs, and the pictures.
# ---------------------------------------------------------------------------------------------------


def compare_rows(base_items: list[dict], runs: list[list[dict]]) -> list[dict]:
    """Per metric: the base's mean and interval, and per run its mean and interval, plus the paired
    difference run - base and its interval (over the items both have). judge_win compares judge scores."""
    rows = []
    for key in METRIC_KEYS:
        source = "judge_score" if key == "judge_win" else key
        if not any(source in item["metrics"] for items in [base_items, *runs] for item in items):
            continue  # a row even when every value is None (e.g. no judge score parsed): "-" says so
        base_values = list(metric_values(base_items, source).values())
        row = {"metric": key, "base": None if key == "judge_win" else cell(base_values), "runs": []}
        for run_items in runs:
            base, run = paired(base_items, run_items, source)
            if key == "judge_win":  # MIPO's protocol: a win when the score is at least the reference's
                row["runs"].append({"value": cell(run >= base), "diff": None})
            else:
                row["runs"].append({"value": cell(list(metric_values(run_items, key).values())), "diff": cell(run - base)})
        rows.append(row)
    return rows


def cell(values) -> dict | None:
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return None
    return {"mean": float(values.mean()), "ci": bootstrap_ci(values), "n": len(values)}


def judge_note(models: list[tuple[dict, list[dict]]], names: list[str]) -> str:
    """How many judge replies held no score 1-5, per model: each counts as a score of 1 in judge_score."""
    counts = []
    for name, (_, items) in zip(names, models):
        scores = [s for item in items for s in item.get("judge", {}).get("scores", [])]
        if scores:
            counts.append(f"{name} {sum(s is None for s in scores)}/{len(scores)}")
    return f"judge replies without a score 1-5 (each counted as 1): {', '.join(counts)}" if counts else ""


def format_table(rows: list[dict], names: list[str], markdown: bool) -> str:
    header = ["metric", names[0]]
    for name in names[1:]:
        header += [name, f"diff [{CONFIDENCE:.0%} CI]"]
    lines = [header]
    for row in rows:
        line = [row["metric"], "ref" if row["metric"] == "judge_win" else number(row["base"])]
        for run in row["runs"]:
            if row["metric"] == "judge_win":
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


def report(rows: list[dict], names: list[str], models, task: Task, args, settings: dict, note: str) -> str:
    """The Markdown file: the command, the settings, the table, the judge's unparsed replies, the legend."""
    used = {row["metric"] for row in rows}
    legend = [f"- `{key}`: {text}" for key, text in METRICS if key in used] + ([f"- {note}"] if note else [])
    return "\n".join([
        f"# {task.name}: {names[0]} vs {', '.join(names[1:])}", "",
        "Models: " + "; ".join(f"{name} = `{spec['model']}`" for name, (spec, _) in zip(names, models)), "",
        f"`python eval.py {' '.join(args.argv)}`", "",
        f"{settings['n']} held-out items, sampling {settings['sampling']}, seed {settings['seed']}, "
        f"judge {args.judge}; {machine(args.device)}. Differences are run - base on the same items; intervals are "
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
            print("plots skipped: matplotlib is not installed (pip install matplotlib); the tables are written", file=sys.stderr)
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
        errors = [[cells[k]["mean"] - cells[k]["ci"][0] for k in shown], [cells[k]["ci"][1] - cells[k]["mean"] for k in shown]]
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


def read_metrics(path: Path) -> list[dict]:
    records, lines = [], path.read_text().splitlines()
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if lineno < len(lines):  # only the last line may be cut short, by a train.py still writing it
                    raise MipoError(f"{path}:{lineno}: not valid JSON ({e.msg})")
    return records


def plot_training_curves(run: Path, out_png: Path) -> bool:
    """Loss, reward accuracy, margins, chosen and rejected log-probs and the MI meter against the step."""
    path = run / RUN_METRICS
    if not path.is_file():
        return False
    records = [r for r in read_metrics(path) if isinstance(r, dict)]
    plt = pyplot()
    if plt is None or not records:
        return False
    pmi_keys = sorted({k for r in records for k in r if "pmi" in k})
    meter = read_json(run / RUN_SUMMARY)  # train.py meters the held-out MI before and after, not at every step
    before_after = [(step, meter[key]["pmi"]) for step, key in ((0, "base_eval"), (records[-1].get("step", len(records)), "trained_eval"))
                    if isinstance(meter.get(key), dict) and isinstance(meter[key].get("pmi"), (int, float))]
    panels = [("loss", ["loss"]), ("reward accuracy", ["rewards/accuracies"]), ("reward margin", ["rewards/margins"]),
              ("rewards", ["rewards/chosen", "rewards/rejected"]), ("log-probs (summed)", ["logps/chosen", "logps/rejected"]),
              ("MI meter (nats)", pmi_keys)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(r.get("step", k), r[key]) for k, r in enumerate(records) if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
        if title.startswith("MI meter") and not keys and before_after:
            ax.plot(*zip(*before_after), marker="o", label=f"held-out pmi under the base model, before -> after ({RUN_SUMMARY})")
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"not in {RUN_METRICS}", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
    fig.suptitle(str(run), fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_png)
    plt.close(fig)
    return True


def save_figure(fig, out_png: Path) -> None:
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out_png)


# ---------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a model or a MIPO run on a task's held-out items, or compare runs with their base.")
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--model", default=None, help="a train.py run directory, a Hugging Face model directory, a bundled name (qwen, llama, smollm2), or a hub name (owner/name)")
    what.add_argument("--revision", default=None, help="the commit (or branch, tag) of the hub model among --model / --compare (default main)")
    what.add_argument("--compare", nargs="+", default=None, metavar="BASE RUN",
                      help="BASE RUN [RUN ...]: one table of each metric for the base and each run, the paired difference and its 95%% bootstrap interval")
    what.add_argument("--task", default=None, help=f"one of: {', '.join(mipo.TASKS)} (default: the run's task, from its {RUN_CONFIG})")
    what.add_argument("--data", default=None, help="--task jsonl: the task's JSONL file (prompt, optional context, answer, id); "
                      "every fifth item is held out (default: the run's)")
    what.add_argument("--eval-data", default=None, help="--task jsonl: a separate file of held-out items (default: the run's)")
    what.add_argument("--n", type=int, default=None, help=f"held-out items, the same ones for every model (default {N_DEFAULT['cpu']} on a CPU, {N_DEFAULT['gpu']} on a GPU)")
    what.add_argument("--out", default=None, help="where results go (default: RUN/eval for a run, runs/eval/NAME otherwise); with --compare: where the table and chart go (default: each run's eval dir)")
    judging = parser.add_argument_group("judge and meters")
    judging.add_argument("--judge", default=DEFAULT_JUDGE, help=f"judge model for personalization: bundled name or model directory, or 'none' (default {DEFAULT_JUDGE})")
    judging.add_argument("--no-mi", action="store_true", help="skip the pointwise-MI meters (two extra forward passes per item "
                         "and model, and as many under the base model)")
    judging.add_argument("--mi-reference", default=None, help="the base model that scores every model's responses for the "
                         "pmi meter (default: the --compare base, else the model the run was trained from, else the model itself)")
    judging.add_argument("--force", action="store_true", help="evaluate again even when cached results with the same settings exist")
    sampling = parser.add_argument_group("sampling (defaults: the paper's, scaled down on a CPU)")
    sampling.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per response")
    sampling.add_argument("--temperature", type=float, default=None, help="sampling temperature (0: greedy)")
    sampling.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    sampling.add_argument("--top-k", type=int, default=None, help="top-k filter (0: off)")
    sampling.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every model (default 0)")
    sampling.add_argument("--batch-size", type=int, default=16, help="prompts per generate call and rows per MI forward")
    device = parser.add_argument_group("device")
    device.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default cuda if available)")
    device.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default bfloat16 on a GPU or a CPU with AVX-512 BF16 / AMX, else float32")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if (args.model is None) == (args.compare is None):
        raise MipoError("pass --model MODEL to evaluate one model, or --compare BASE RUN [RUN ...]")
    if args.compare is not None and len(args.compare) < 2:
        raise MipoError(f"--compare {' '.join(args.compare)}: needs a base and at least one run")
    if args.batch_size < 1:
        raise MipoError(f"--batch-size {args.batch_size}: must be at least 1")
    wanted = args.compare or [args.model]
    if args.revision is not None and not any(is_hub_name(name) for name in wanted):
        raise MipoError(f"--revision {args.revision}: pins a Hugging Face hub model (owner/name), and none of "
                        f"{', '.join(wanted)} is one; leave --revision out")
    specs = [resolve(name, args.revision) for name in wanted]  # every path checked before any work

    # The task and its data: the flag, else the first run's config.
    config = next((run_data_settings(s["run"]) for s in specs[1:] + specs[:1] if s["run"] is not None), {})
    task_name = args.task or config.get("task")
    if task_name is None:
        raise MipoError("--task is required: no run directory among the models says which task it was trained on")
    task = get_task(task_name)
    same_task = task_name == config.get("task")
    data = args.data or (config.get("data") if same_task else None)
    eval_data = args.eval_data or (config.get("eval_data") if same_task and not args.data else None)
    on_gpu = torch.device(args.device).type != "cpu"
    examples = load_examples(task, "eval", args.n or N_DEFAULT["gpu" if on_gpu else "cpu"], data, eval_data)
    base = mipo.default_sampling(task, args.device)
    overrides = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens}
    sampling = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0 or sampling.max_new_tokens < 1:
        raise MipoError(f"sampling settings {asdict(sampling)}: need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0, --max-new-tokens >= 1")
    fast_bf16 = on_gpu or cpu_has_fast_bf16()  # as train.py: bf16 where the hardware multiplies it natively
    args.torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype or ("bfloat16" if fast_bf16 else "float32")]
    settings = {"task": task.name, "data": str(data) if data else None, "eval_data": str(eval_data) if eval_data else None,
                "n": len(examples), "sampling": asdict(sampling),
                "seed": args.seed, "mi": not args.no_mi, "dtype": str(args.torch_dtype).removeprefix("torch.")}
    if args.model is not None and args.out:
        specs[0]["eval_dir"] = Path(args.out)
    if args.judge != "none" and any(judge_preferences(task, ex) for ex in examples):
        resolve(args.judge)  # a judge that does not exist fails now, not after the sampling
    args.mi_reference = None if args.no_mi else mi_reference(args, specs)

    models = [(spec, results_for(spec, task, examples, args, settings)) for spec in specs]
    meter_all(models, task, examples, args)
    judge_all(models, task, examples, args)
    names = short_names(specs)

    if args.model is not None:  # one model: its summary, and its training curves when it is a run
        spec, items = models[0]
        print(f"{spec['name']} on {task.name}: {len(items)} items -> {spec['eval_dir']}")
        for key, c in summarize(items).items():
            print(f"  {key:<22} {interval(c)}")
        if judge_note([models[0]], names):
            print(f"  {judge_note([models[0]], names)}")
        if spec["run"] is not None and plot_training_curves(spec["run"], spec["eval_dir"] / "curves.png"):
            print(f"  curves: {spec['eval_dir'] / 'curves.png'}")
        return

    rows = compare_rows(models[0][1], [items for _, items in models[1:]])
    print(f"{task.name}: {len(examples)} held-out items; diff = run - base on the same items, "
          f"{CONFIDENCE:.0%} paired bootstrap interval; * excludes 0")
    print(format_table(rows, names, markdown=False))
    note = judge_note(models, names)
    if note:
        print(note)
    out_dirs = [Path(args.out)] if args.out else [spec["eval_dir"] for spec in specs[1:]]
    for out_dir in out_dirs:
        write_atomically(out_dir / f"compare-{task.name}.md", report(rows, names, models, task, args, settings, note))
        plot_comparison(rows, names, out_dir / f"compare-{task.name}.png")
        print(f"table: {out_dir / f'compare-{task.name}.md'}", file=sys.stderr)
    for spec in specs:
        if spec["run"] is not None and plot_training_curves(spec["run"], spec["eval_dir"] / "curves.png"):
            print(f"curves: {spec['eval_dir'] / 'curves.png'}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except MipoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
