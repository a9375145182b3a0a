"""The files of train.py's held-out meter (the meter itself is mipo.held_out_meter and mipo.trained_meter):
base_eval.json, the base model's meter on its own held-out samples before training, and summary.json, which holds it
with the trained model's meter after training, the step-0 check and the last step; beside each, the same meter token
by token (base_eval.tokens.jsonl, trained_eval.tokens.jsonl: bookkeeping/pmi_page.py).
"""
import json

import mipo
from bookkeeping import pmi_page
from bookkeeping.runs import Run
from formats import pairs_file
from formats.dtypes import torch_dtype
from formats.files import read_jsonl, write_atomically
from model_loader import load_model
from tasks import get_task, load_examples
from transforms import cpu_speedups


BASE_TOKENS = "base_eval" + pmi_page.TOKENS_SUFFIX
TRAINED_TOKENS = "trained_eval" + pmi_page.TOKENS_SUFFIX


def chosen_responses(eval_pairs: list[dict]) -> list[tuple[str, bool]]:
    return [(p["chosen"][0]["content"], p.get("chosen_stopped", True)) for p in eval_pairs]


def write_base_meter(run: Run, model, tokenizer, task, examples, eval_pairs: list[dict]) -> None:
    """base_eval.json, written once by rank 0: the meter of the held-out pairs' chosen responses, the base model's
    own samples from x, scored by the base model itself (so pmi_self = pmi)."""
    path = run.shared_file("base_eval.json")
    if eval_pairs and run.rank == 0 and not path.exists():
        pairs_file.use_recorded_date(tokenizer, eval_pairs, run.shared_file("eval_pairs.jsonl"))
        base_eval = mipo.held_out_meter(model, tokenizer, task, examples, chosen_responses(eval_pairs))
        base_eval["pmi_self"] = base_eval["pmi"]
        pmi_page.write_token_rows(run.shared_file(BASE_TOKENS), pmi_page.meter_token_rows(tokenizer, base_eval))
        write_atomically(path, json.dumps(base_eval, indent=2))
    run.barrier()


def read_base_meter(run: Run) -> dict | None:
    path = run.shared_file("base_eval.json")
    return json.loads(path.read_text()) if path.exists() else None


def trained_meter(run: Run, eval_pairs: list[dict]) -> dict:
    """mipo.trained_meter of the run's final model, each model loaded as the base model sampled (its dtype, the
    chat template's recorded date, the CPU speed-ups); its terms per token written to trained_eval.tokens.jsonl."""
    cfg, eval_path = run.pairs, run.out / "eval_pairs.jsonl"
    task = get_task(cfg.task)
    eval_examples = load_examples(task, "eval", cfg.n_eval, cfg.data, cfg.eval_data)
    dtype = torch_dtype(run.hw.dtype, run.hw.device)
    tokenizers = []

    def load(name):
        model, tokenizer = load_model(name, run.hw.device, dtype)
        pairs_file.use_recorded_date(tokenizer, eval_pairs, eval_path)
        model.compile_decode = run.hw.compile  # --compile: sampler.generate reads it
        tokenizers.append(tokenizer)
        return cpu_speedups.apply(model), tokenizer

    sampling = mipo.resolve_sampling(cfg.sampling, cfg.model)  # the base model's defaults, as its samples had
    meter = mipo.trained_meter(load, run.out / "final", cfg.model, task, eval_examples, sampling, cfg.seed,
                               2 * cfg.sample_batch_size)
    pmi_page.write_token_rows(run.out / TRAINED_TOKENS, pmi_page.meter_token_rows(tokenizers[-1], meter))
    return meter


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
