"""The held-out meter train.py prints: the pointwise mutual information the base model gives the responses to
held-out prompts (mipo.mi_meter), before training on the base model's own samples (base_eval.json) and after it on
the trained model's (summary.json's trained_eval), with each prompt's numbers for paired comparisons; and
summary.json, which holds it.
"""
import json

import torch

import mipo
from model_loader import load_model
from tasks import get_task, load_examples
from plumbing import config, cpu_speedups, pairs_file
from plumbing.config import PairsConfig
from plumbing.files import read_jsonl, write_atomically
from plumbing.runs import Run


@torch.no_grad()
def held_out_meter(reference, tokenizer, task, examples, responses: list[tuple[str, bool]], cfg: PairsConfig) -> dict:
    """The held-out meter of responses (text, stopped), one per held-out prompt, sampled by the measured model: the
    mean pointwise mutual information log p(y|x) - log p(y|x') under the reference (base) model, what MIPO claims
    to raise (mipo.mi_meter, x' each held-out pair's own), their length and truncation, and the task's metric."""
    was_training = reference.training
    reference.eval()
    meter = mipo.mi_meter(reference, tokenizer, mipo.meter_rows(task, examples, responses, cfg.negative, cfg.seed))
    reference.train(was_training)
    items, scores = [], {}
    for ex, (text, stopped), mi in zip(examples, responses, meter.pop("per_response")):
        task_scores = task.score(ex, text)
        for metric, value in task_scores.items():
            scores.setdefault(metric, []).append(value)
        per_token = mi["pmi"] / mi["length"] if mi["length"] else None
        items.append({"id": ex.id, "metrics": {**mi, "pmi_per_token": per_token, "truncated": float(not stopped),
                                               **task_scores}})
    # items: each held-out prompt's numbers, in eval.py's layout, for paired intervals between runs (plumbing/sweep.py)
    return {**meter, "task": {metric: sum(v) / len(v) for metric, v in scores.items()}, "items": items}


def chosen_responses(eval_pairs: list[dict]) -> list[tuple[str, bool]]:
    return [(p["chosen"][0]["content"], p.get("chosen_stopped", True)) for p in eval_pairs]


def write_base_meter(run: Run, model, tokenizer, task, examples, eval_pairs: list[dict]) -> None:
    """base_eval.json, written once by rank 0: the meter of the held-out pairs' chosen responses, the base model's
    own samples from x, scored by the base model itself (so pmi_self = pmi)."""
    path = run.shared_file("base_eval.json")
    if eval_pairs and run.rank == 0 and not path.exists():
        pairs_file.use_recorded_date(tokenizer, eval_pairs, run.shared_file("eval_pairs.jsonl"))
        base_eval = held_out_meter(model, tokenizer, task, examples, chosen_responses(eval_pairs), run.pairs)
        base_eval["pmi_self"] = base_eval["pmi"]
        write_atomically(path, json.dumps(base_eval, indent=2))
    run.barrier()


def read_base_meter(run: Run) -> dict | None:
    path = run.shared_file("base_eval.json")
    return json.loads(path.read_text()) if path.exists() else None


def own_responses(model, tokenizer, eval_pairs, cfg: PairsConfig) -> list[tuple[str, bool]]:
    """The (trained) model's own responses to the held-out prompts, sampled with the base model's settings and seed."""
    sampling = config.resolve_sampling(cfg.sampling, cfg.model)  # the base model's defaults, as its samples had
    prompts = [tokenizer.apply_chat_template(p["prompt"]) for p in eval_pairs]
    return mipo.sample_responses(model, tokenizer, prompts, sampling, cfg.seed, 2 * cfg.sample_batch_size)


def trained_meter(run: Run, eval_pairs: list[dict]) -> dict:
    """The trained model samples its own responses to the held-out prompts; the base model scores them (the meter
    MIPO's claim is about), and the trained model too (pmi_self, for comparison only)."""
    cfg, eval_path = run.pairs, run.out / "eval_pairs.jsonl"
    task = get_task(cfg.task)
    eval_examples = load_examples(task, "eval", cfg.n_eval, cfg.data, cfg.eval_data)
    dtype = config.torch_dtype(run.hw.dtype, run.hw.device)  # the base model's, as its samples had
    policy, tokenizer = load_model(run.out / "final", run.hw.device, dtype)
    cpu_speedups.apply(policy)
    pairs_file.use_recorded_date(tokenizer, eval_pairs, eval_path)
    own = own_responses(policy, tokenizer, eval_pairs, cfg)
    pmi_self = held_out_meter(policy, tokenizer, task, eval_examples, own, cfg)["pmi"]
    del policy
    reference, tokenizer = load_model(cfg.model, run.hw.device, dtype)
    cpu_speedups.apply(reference)
    pairs_file.use_recorded_date(tokenizer, eval_pairs, eval_path)
    return {**held_out_meter(reference, tokenizer, task, eval_examples, own, cfg), "pmi_self": pmi_self}


def run_summary(run: Run, pair_stats: dict, base_eval, eval_pairs) -> dict:
    """summary.json (written once): the pairs, the step-0 check, the last step, the held-out meter before and after."""
    summary_path = run.out / "summary.json"
    if not summary_path.exists():
        history = read_jsonl(run.out / "metrics.jsonl")
        summary = {"final": str(run.out / "final"), "pairs": pair_stats, "step0": history[0], "last": history[-1],
                   "base_eval": base_eval, "trained_eval": None, "timings_s": run.timings}
        if eval_pairs:
            with run.timed("held_out_eval"):
                summary["trained_eval"] = trained_meter(run, eval_pairs)
        write_atomically(summary_path, json.dumps(summary, indent=2))
    return json.loads(summary_path.read_text())
