"""Evaluation: does a MIPO run beat its base instruct model on the paper's own measures, and by how much? Every
response is sampled here (no training pairs) and measured as the paper's scripts do (differences: docs/protocol.md):
  persona    the paper's judge, one score per stated preference, a win when at least a fixed reference's; rule checks;
  movielens  mean absolute error and exact-rating accuracy, next to the user's own mean rating;
  gsm8k      the number after the first '####', else the same model asked to extract it (--answer-fallback);
  arc, mmlu  the first standalone A-D after the first "the answer is";
  every task the pointwise MI meter under the BASE model: pmi, pmi_per_token, pmi_self, length.
Per-item results are cached in RUN/eval/TASK.jsonl; --compare pairs items by id for bootstrap intervals.

    python eval.py --model qwen --task persona --n 50
    python eval.py --compare qwen runs/persona-qwen runs/persona-qwen-ipo
"""
import hashlib
import re
import sys
import time
from dataclasses import asdict

import torch

import mipo
from model_loader import free_memory
from sampler import Sampling
from tasks import (GSM8K_EXTRACT_PROMPT, PREFERENCE_BY_ID, Example, Task, extract_number, first_number,
                   mentions_answer, nearest_rating, prompt_messages, score_gsm8k_answer)
from bookkeeping import config, pmi_page, results
from bookkeeping.report import print_one, short_names, write_comparison
from bookkeeping.results import fingerprint, locate, resolve, update_summary
from formats.files import MipoError, run_command
from transforms import cpu_speedups

# The paper's judge (prism.py; ca.py, mb.py alike), verbatim; its use: docs/protocol.md.
JUDGE_SYSTEM = ("You are a helpful assistant, that evaluates another assistant's response based on how well the "
                "response is personalized to this user based on their stated preference. Give a score between 1 and 5, "
                "1 if the response is general, and 5 if the response sufficiently addresses the user's preference. "
                "Only respond with a number between 1 and 5 and do not provide an explanation.")
JUDGE_USER = "User: {prompt}\n\nAssistant: {response}\n\nUser's preference: {preference}"
# The judge and GSM8K's answer extraction decode as the paper's (the rest: generation config); only the reply's
# first number is read, so on a CPU the budget is cut to 32 tokens.
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
    """{metric: value or None (not applicable)} for one response."""
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
    """The stated preferences the judge scores one at a time; [] if none."""
    if task.name == "persona":
        return [PREFERENCE_BY_ID[rule][2] for rule in ex.meta["rules"]]
    if task.name == "jsonl" and ex.context:  # the user's own context: one preference per line
        return [line.strip().lstrip("-*\u2022 ").strip() for line in ex.context.splitlines() if line.strip()]
    return []


def parse_judge_score(reply: str) -> int | None:
    """The paper's reading of a judge reply: its first integer; None if it has none."""
    found = re.search(r"\d+", reply)
    return int(found.group()) if found else None


def set_judge_wins(items: list[dict], reference_items: list[dict]) -> None:
    """The paper's win rule: judge_win is 1 where an item's score >= its reference answer's (ties win), 0 where
    either has none."""
    reference = {item["id"]: item["metrics"].get("judge_score") for item in reference_items}
    for item in items:
        score, reference_score = item["metrics"].get("judge_score"), reference.get(item["id"])
        item["metrics"]["judge_win"] = float(score is not None and reference_score is not None
                                             and score >= reference_score)


def judge_metrics(item: dict, unparsed: str) -> None:
    """judge_score: an item's mean score, a reply without an integer skipped (unparsed "skip", the paper's rule)
    or counted as 1 ("one"); judge_unparsed: the share of such replies."""
    scores = item["judge"]["scores"]
    counted = [s for s in scores if s is not None] if unparsed == "skip" else [1 if s is None else s for s in scores]
    item["metrics"]["judge_score"] = sum(counted) / len(counted) if counted else None
    item["metrics"]["judge_unparsed"] = sum(s is None for s in scores) / len(scores) if scores else None


# ---------------------------------------------------------------------------------------------------
# One model: sample a response per held-out item, score it, meter the MI, judge it.
# ---------------------------------------------------------------------------------------------------


def check_fits(model, prompts: list[list[int]], max_new_tokens: int, what: str) -> None:
    limit = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > limit:
        raise MipoError(f"{what}: a prompt of {longest} tokens + --max-new-tokens {max_new_tokens} exceeds the model's "
                        f"context window of {limit} tokens; lower --max-new-tokens")


def meter_rows(task: Task, examples: list[Example], items: list[dict]) -> list[tuple]:
    """mipo.meter_rows of the items' responses: the x' train.py's held-out meter uses too."""
    return mipo.meter_rows(task, examples, [(item["response"], item["stopped"]) for item in items])


def can_meter(task: Task, examples: list) -> bool:
    return not task.negative.startswith("random") or len(examples) >= 2  # a random x' needs another item


def evaluate(model, tokenizer, task: Task, examples: list[Example], sampling: Sampling, seed: int,
             batch_size: int = 16, mi: bool = True, progress: bool = True,
             answer_fallback: str = "model") -> list[dict]:
    """One record per item: {id, response, stopped, metrics}; with mi, pmi_self and the length in tokens (pmi is
    meter_all's). answer_fallback: see read_missing_answers."""
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
        values, lengths, _ = mipo.pointwise_mi(model, tokenizer, meter_rows(task, examples, items), batch_size,
                                               progress=True)
        for item, value, length in zip(items, values, lengths):
            item["metrics"].update(pmi_self=value, length=float(length))
    return items


def judge(judge_model, judge_tokenizer, task: Task, examples: list[Example], items: list[dict], sampling: Sampling,
          seed: int, batch_size: int = 16, progress: bool = True) -> None:
    """The paper's judge (docs/protocol.md), once per stated preference: fills item["judge"] with the scores (None:
    no integer) and the raw replies."""
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
    """GSM8K: where '####' gave no number, the answer the same model extracts (how "model", the paper's) or
    this project's rules find ("rules")."""
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
    """One model's cached results (bookkeeping/results.py), or a fresh evaluation saved to its eval dir."""
    settings, items = results.cached(spec, task, examples, settings, args.force)  # with this model's sampling defaults
    if items is None:
        model, tokenizer = results.load(spec["model"], args)
        print(f"{spec['name']}: evaluating {len(examples)} {task.name} items, {settings['sampling']}", file=sys.stderr)
        start = time.time()
        items = evaluate(model, tokenizer, task, examples, Sampling(**settings["sampling"]), args.seed,
                         args.batch_size, not args.no_mi, progress=True, answer_fallback=args.answer_fallback)
        del model
        free_memory()  # now, before the next model loads
        results.save_evaluation(spec, task, items, settings, time.time() - start, args.device)
    return items


def judge_settings(args) -> dict:
    """What an item was judged with; items judged otherwise are judged again."""
    protocol = hashlib.sha256((JUDGE_SYSTEM + JUDGE_USER).encode()).hexdigest()[:12]
    where = "cpu" if torch.device(args.device).type == "cpu" else "paper"
    sampling = mipo.resolve_sampling(READER_SAMPLING[where], locate(args.judge)["model"])
    return {"model": args.judge, "prompt": protocol, "sampling": asdict(sampling), "seed": args.seed}


def judge_all(models: list[tuple[dict, list[dict]]], task: Task, examples, args) -> None:
    """Judge what is not yet judged with these settings (one judge load), then set judge metrics."""
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
        free_memory()
    for spec, items in models:
        for item in items:
            judge_metrics(item, args.judge_unparsed)
        scores = [s for item in items for s in item["judge"]["scores"]]
        update_summary(spec, task, items, judge={**settings, "scored": len(scores),
                                                 "unparsed": sum(s is None for s in scores),
                                                 "unparsed_rule": args.judge_unparsed})


def meter_all(models: list[tuple[dict, list[dict]]], task: Task, examples, args) -> None:
    """pmi: each model's responses scored by the base model (loaded once) where not yet scored, and its terms per
    token in EVAL_DIR/TASK.tokens.jsonl; MIPO's claim is that training raises it (docs/walkthrough.md step 14)."""
    if args.no_mi or not can_meter(task, examples):
        return
    reference = {"model": args.mi_reference["name"], "files": fingerprint(args.mi_reference["model"])}
    todo = [(spec, items) for spec, items in models if any(item.get("mi_reference") != reference for item in items)
            or not pmi_page.tokens_file(spec["eval_dir"], task.name).is_file()]
    if not todo:
        return
    model, tokenizer = results.load(args.mi_reference["model"], args)
    for spec, items in todo:
        print(f"{spec['name']}: pointwise MI of {len(items)} responses under {args.mi_reference['name']}",
              file=sys.stderr)
        values, lengths, terms = mipo.pointwise_mi(model, tokenizer, meter_rows(task, examples, items),
                                                   args.batch_size, progress=True)
        for item, value, length in zip(items, values, lengths):
            item["metrics"]["pmi"], item["mi_reference"] = value, reference
            item["metrics"]["pmi_per_token"] = value / length if length else None
        pmi_page.write_token_rows(pmi_page.tokens_file(spec["eval_dir"], task.name), pmi_page.token_rows(
            tokenizer, [item["id"] for item in items], values, [item["stopped"] for item in items], terms))
        update_summary(spec, task, items, mi_reference=reference)
    del model
    free_memory()


# ---------------------------------------------------------------------------------------------------
# Command line (flags: config.eval_parser; what they name: bookkeeping/results.py).
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
    print(cpu_speedups.plan_line(args.device), file=sys.stderr)

    models = [(spec, results_for(spec, task, examples, args, settings)) for spec in specs]
    meter_all(models, task, examples, args)
    judge_all(models + ([reference] if reference else []), task, examples, args)
    if judged:  # against one fixed reference answer per item (--judge-reference), else against the base's answers
        for _, items in (models if reference else models[1:]):
            set_judge_wins(items, reference[1] if reference else models[0][1])
    if args.model is not None:
        print_one(models[0], task, short_names(specs), args, reference is not None)
    else:
        write_comparison(models, task, examples, args, settings, reference is not None)


if __name__ == "__main__":
    run_command(main)
