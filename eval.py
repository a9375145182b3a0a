"""Evaluation: does a MIPO run beat its base instruct model on the paper's own measures, and by how much?
It never trains or changes a model and does not reuse the training pairs: every response it scores is sampled here.

The paper (Nam, Li, Jaques, arXiv 2603.19294) reports gains over the base instruct model: 3-40% on
personalization, 1-18% on math and multiple choice. Its own evaluation scripts define how each is measured, and
this file follows them (docs/protocol.md lists every remaining difference):
  persona    the paper's judge: a judge model scores each response once per stated preference (its system prompt
             and user message verbatim, T 0.1, top-p 0.9), the score is the reply's first integer, and a response
             wins when its score is at least that of one fixed reference answer per item (--judge-reference, else
             the base model's answer); beside it, the rule checks of the stated preferences (tasks.py) and whether
             the NQ answer appears (a degeneracy guard);
  movielens  mean absolute error and exact-rating accuracy, next to the user's own mean rating;
  gsm8k      the number after the first '####' (tasks.paper_gsm8k_answer); where there is none, the same model is
             asked to extract it, as the paper does (--answer-fallback);
  arc, mmlu  the first standalone A-D after the first "the answer is" (tasks.paper_letter);
  every task the pointwise MI meter: log p(y|x) - log p(y|x') of the model's own response y under the BASE
             model, x' the task's negative prompt (the MIPO paper): what one epoch of DPO on MIPO pairs claims to
             raise (pmi), the same per token of y (pmi_per_token: the sum grows with the length), the same scored
             by the model itself (pmi_self), the length and the share cut short.
Each model's per-item results are cached next to it (RUN/eval/TASK.jsonl), so `--compare` evaluates only
what is missing and pairs items by id for a bootstrap interval of every difference.

    python eval.py --model qwen --task persona --n 50
    python eval.py --compare qwen runs/persona-qwen runs/persona-qwen-ipo
"""
import gc
import hashlib
import re
import sys
import time
from dataclasses import asdict

import torch

import mipo
from sampler import Sampling
from tasks import (DATA_SEED, GSM8K_EXTRACT_PROMPT, PREFERENCE_BY_ID, Example, Task, extract_number, first_number,
                   mentions_answer, nearest_rating, prompt_messages, score_gsm8k_answer)
from plumbing import config, report, results
from plumbing.files import MipoError, run_command
from plumbing.report import print_one, short_names, write_comparison
from plumbing.results import fingerprint, locate, resolve, update_summary

MI_SEED = DATA_SEED  # fixes x' of the MI meter, so every model is measured against the same other prompts

# The paper's judge (its prism.py; ca.py and mb.py use the same), verbatim: a system turn, and a user turn with the
# user's own prompt (without the template and the requirements), the evaluated answer and ONE stated preference.
JUDGE_SYSTEM = ("You are a helpful assistant, that evaluates another assistant's response based on how well the "
                "response is personalized to this user based on their stated preference. Give a score between 1 and 5, "
                "1 if the response is general, and 5 if the response sufficiently addresses the user's preference. "
                "Only respond with a number between 1 and 5 and do not provide an explanation.")
JUDGE_USER = "User: {prompt}\n\nAssistant: {response}\n\nUser's preference: {preference}"
# The paper's judge and its GSM8K answer extraction (the model asked for the number when '####' gives none) both decode
# at T 0.1, top-p 0.9, 1024 new tokens, top-k and repetition penalty from the model's generation config. Only the
# reply's first integer or number is read, so on a CPU the budget is cut to 32 tokens.
READER_SAMPLING = {"paper": Sampling(0.1, top_p=0.9, max_new_tokens=1024),
                   "cpu": Sampling(0.1, top_p=0.9, max_new_tokens=32)}


# ---------------------------------------------------------------------------------------------------
# Per-item metrics: mipo.py's checkers plus what the evaluation adds.
# ---------------------------------------------------------------------------------------------------


def user_mean_rating(ex: Example) -> float:
    """The mean of the past ratings a movielens prompt shows ("- Title (genres): 4" lines)."""
    ratings = [int(r) for r in re.findall(r"^- .*: ([1-5])$", ex.context, re.M)]
    if not ratings:
        raise MipoError(f"movielens item {ex.id}: its context shows no past ratings")
    return sum(ratings) / len(ratings)


def score_item(task: Task, ex: Example, response: str) -> dict:
    """{metric: value or None} for one response; None where the metric does not apply (e.g. no rating parsed)."""
    metrics = dict(task.score(ex, response))
    if task.name == "persona":
        metrics["answer_found"] = float(mentions_answer(response, ex.meta["answers"]))
    if task.name == "movielens":
        metrics.setdefault("abs_error", None)  # no rating parsed: not in the MAE, counted in `parsed`
        truth, mean = float(ex.answer), user_mean_rating(ex)
        metrics["user_mean_exact"] = float(nearest_rating(mean) == truth)  # rounded as the model's rating
        metrics["user_mean_abs_error"] = abs(mean - truth)
    return metrics


def judge_preferences(task: Task, ex: Example) -> list[str]:
    """The stated preferences the judge scores one at a time; [] where the task has none."""
    if task.name == "persona":
        return [PREFERENCE_BY_ID[rule][2] for rule in ex.meta["rules"]]
    if task.name == "jsonl" and ex.context:  # the user's own context: one preference per line
        return [line.strip().lstrip("-*\u2022 ").strip() for line in ex.context.splitlines() if line.strip()]
    return []


def parse_judge_score(reply: str) -> int | None:
    """The paper's reading of a judge reply: its first integer, whatever it is; None when it has none."""
    found = re.search(r"\d+", reply)
    return int(found.group()) if found else None


def judge_metrics(item: dict, unparsed: str) -> None:
    """judge_score: the mean of an item's scores over its stated preferences, a reply without an integer skipped
    (unparsed "skip", the paper's rule: an item with no score at all has none and never wins) or counted as 1
    ("one"); judge_unparsed: the share of its replies without one."""
    scores = item["judge"]["scores"]
    counted = [s for s in scores if s is not None] if unparsed == "skip" else [1 if s is None else s for s in scores]
    item["metrics"]["judge_score"] = sum(counted) / len(counted) if counted else None
    item["metrics"]["judge_unparsed"] = sum(s is None for s in scores) / len(scores) if scores else None


# ---------------------------------------------------------------------------------------------------
# Evaluating one model: sample a response per held-out item, score it, meter the MI, judge it.
# ---------------------------------------------------------------------------------------------------


def check_fits(model, prompts: list[list[int]], max_new_tokens: int, what: str) -> None:
    limit = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > limit:
        raise MipoError(f"{what}: a prompt of {longest} tokens + --max-new-tokens {max_new_tokens} exceeds the model's "
                        f"context window of {limit} tokens; lower --max-new-tokens")


def meter_rows(task: Task, examples: list[Example], items: list[dict]) -> list[tuple]:
    """mipo.meter_rows of the items' responses, x' fixed by MI_SEED and the items alone, so that every model is
    metered against the same x'."""
    responses = [(item["response"], item["stopped"]) for item in items]
    return mipo.meter_rows(task, examples, responses, task.negative, MI_SEED)


def can_meter(task: Task, examples: list) -> bool:
    return not task.negative.startswith("random") or len(examples) >= 2  # a random x' needs another item


def evaluate(model, tokenizer, task: Task, examples: list[Example], sampling: Sampling, seed: int,
             batch_size: int = 16, mi: bool = True, progress: bool = True,
             answer_fallback: str = "model") -> list[dict]:
    """One record per item: {id, response, stopped, metrics}. With mi, the model's own pointwise MI of its response
    (pmi_self) and the response's length in tokens; the base model's (pmi) is meter_all's. answer_fallback: how a
    GSM8K answer without a number after '####' is read (ANSWER_FALLBACKS)."""
    prompts = [tokenizer.apply_chat_template(prompt_messages(task, ex)) for ex in examples]
    check_fits(model, prompts, sampling.max_new_tokens, f"{task.name} prompts")
    items = []
    for ex, (response, stopped) in zip(
        examples, mipo.sample_responses(model, tokenizer, prompts, sampling, seed, batch_size, progress)
    ):
        items.append({"id": ex.id, "response": response, "stopped": stopped,
                      "metrics": {**score_item(task, ex, response), "truncated": float(not stopped)}})
    if task.name == "gsm8k":
        where = "cpu" if model.lm_head.weight.device.type == "cpu" else "paper"
        read_missing_answers(model, tokenizer, examples, items, answer_fallback, READER_SAMPLING[where], seed,
                             batch_size, progress)
    if mi and can_meter(task, examples):
        values, lengths = mipo.pointwise_mi(model, tokenizer, meter_rows(task, examples, items), batch_size,
                                            progress=True)
        for item, value, length in zip(items, values, lengths):
            item["metrics"].update(pmi_self=value, length=float(length))
    return items


def judge(judge_model, judge_tokenizer, task: Task, examples: list[Example], items: list[dict], sampling: Sampling,
          seed: int, batch_size: int = 16, progress: bool = True) -> None:
    """The paper's personalization protocol: the judge scores each response once per stated preference, seeing the
    user's own prompt (ex.question: no template, no requirements), the response and that one preference. Fills
    item["judge"]: the scores (None where a reply held no integer) and the raw replies."""
    requests = [(k, preference) for k, ex in enumerate(examples) for preference in judge_preferences(task, ex)]
    prompts = [judge_tokenizer.apply_chat_template([
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_USER.format(prompt=examples[k].question, response=items[k]["response"],
                                                      preference=preference)}]) for k, preference in requests]
    for item in items:
        item["judge"] = {"scores": [], "replies": []}
    if not prompts:
        return
    check_fits(judge_model, prompts, sampling.max_new_tokens, "the judge")
    replies = mipo.sample_responses(judge_model, judge_tokenizer, prompts, sampling, seed, batch_size, progress)
    for (k, _), (reply, _) in zip(requests, replies):
        items[k]["judge"]["scores"].append(parse_judge_score(reply))
        items[k]["judge"]["replies"].append(reply)


def read_missing_answers(model, tokenizer, examples: list[Example], items: list[dict], how: str, sampling: Sampling,
                         seed: int, batch_size: int, progress: bool) -> None:
    """GSM8K: where the paper's reader found no number after '####', the answer read the paper's way (how "model": the
    same model asked to extract it, the first number of its reply) or by this project's rules ("rules")."""
    missing = [k for k, item in enumerate(items) if not item["metrics"]["parsed"]]
    if not missing:
        return
    if how == "rules":
        replies = [None] * len(missing)
        answers = [extract_number(items[k]["response"]) for k in missing]
    else:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": GSM8K_EXTRACT_PROMPT.format(
            response=items[k]["response"])}]) for k in missing]
        check_fits(model, prompts, sampling.max_new_tokens, "gsm8k answer extraction")
        replies = [text for text, _ in mipo.sample_responses(model, tokenizer, prompts, sampling, seed, batch_size,
                                                             progress)]
        answers = [first_number(reply) for reply in replies]
    for k, reply, answer in zip(missing, replies, answers):
        items[k]["fallback"] = {"how": how, "reply": reply, "answer": answer}
        items[k]["metrics"]["correct"] = score_gsm8k_answer(examples[k], answer)


def results_for(spec: dict, task: Task, examples, args, settings: dict) -> list[dict]:
    """Cached results of one model (plumbing/results.py), or a fresh evaluation saved to its eval dir."""
    settings, items = results.cached(spec, task, examples, settings, args.force)  # with this model's sampling defaults
    if items is None:
        model, tokenizer = results.load(spec["model"], args)
        print(f"{spec['name']}: evaluating {len(examples)} {task.name} items, {settings['sampling']}", file=sys.stderr)
        start = time.time()
        items = evaluate(model, tokenizer, task, examples, Sampling(**settings["sampling"]), args.seed,
                         args.batch_size, not args.no_mi, progress=True, answer_fallback=args.answer_fallback)
        del model
        gc.collect()  # the decoder holds reference cycles: freed now, before the next model loads
        results.save_evaluation(spec, task, items, settings, time.time() - start, args.device)
    return items


def judge_settings(args) -> dict:
    """What a judged item was judged with: results judged otherwise are judged again."""
    protocol = hashlib.sha256((JUDGE_SYSTEM + JUDGE_USER).encode()).hexdigest()[:12]
    where = "cpu" if torch.device(args.device).type == "cpu" else "paper"
    sampling = config.resolve_sampling(READER_SAMPLING[where], locate(args.judge)["model"])
    return {"model": args.judge, "prompt": protocol, "sampling": asdict(sampling), "seed": args.seed}


def judge_all(models: list[tuple[dict, list[dict]]], task: Task, examples, args) -> None:
    """Judge every model's responses that were not judged with these settings yet (one judge load for all), and
    set each item's judge metrics by --judge-unparsed."""
    if args.judge == "none" or not any(judge_preferences(task, ex) for ex in examples):
        return
    settings = judge_settings(args)
    todo = [(spec, items) for spec, items in models
            if any(item.get("judge", {}).get("settings") != settings for item in items)]
    if todo:
        judge_model, judge_tokenizer = results.load(resolve(args.judge)["model"], args)
        for spec, items in todo:
            print(f"{spec['name']}: judging {len(items)} responses with {args.judge}", file=sys.stderr)
            judge(judge_model, judge_tokenizer, task, examples, items, Sampling(**settings["sampling"]), args.seed,
                  args.batch_size)
            for item in items:
                item["judge"]["settings"] = settings
        del judge_model
        gc.collect()
    for spec, items in models:
        for item in items:
            judge_metrics(item, args.judge_unparsed)
        scores = [s for item in items for s in item["judge"]["scores"]]
        update_summary(spec, task, items, judge={**settings, "scored": len(scores),
                                                 "unparsed": sum(s is None for s in scores),
                                                 "unparsed_rule": args.judge_unparsed})


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
    model, tokenizer = results.load(args.mi_reference["model"], args)
    for spec, items in todo:
        print(f"{spec['name']}: pointwise MI of {len(items)} responses under {args.mi_reference['name']}",
              file=sys.stderr)
        values, lengths = mipo.pointwise_mi(model, tokenizer, meter_rows(task, examples, items), args.batch_size,
                                            progress=True)
        for item, value, length in zip(items, values, lengths):
            item["metrics"]["pmi"], item["mi_reference"] = value, reference
            item["metrics"]["pmi_per_token"] = value / length if length else None
        update_summary(spec, task, items, mi_reference=reference)
    del model
    gc.collect()


# ---------------------------------------------------------------------------------------------------
# Command line (flags: config.eval_parser; what they name: plumbing/results.py).
# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = config.eval_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    specs, task, examples, settings = results.plan(args)  # every flag and name checked before any work
    judged = args.judge != "none" and any(judge_preferences(task, ex) for ex in examples)
    if judged:
        resolve(args.judge)  # a judge that does not exist fails now, not after the sampling
    reference = results.judge_reference(args, task, examples) if judged else None
    args.mi_reference = None if args.no_mi else results.mi_reference(args, specs)

    models = [(spec, results_for(spec, task, examples, args, settings)) for spec in specs]
    meter_all(models, task, examples, args)
    judge_all(models + ([reference] if reference else []), task, examples, args)
    reference_scores = None if reference is None else report.judge_scores(reference[1])
    if args.model is not None:
        print_one(models[0], task, short_names(specs), args, reference_scores)
    else:
        write_comparison(models, task, examples, args, settings, reference_scores)


if __name__ == "__main__":
    run_command(main)
