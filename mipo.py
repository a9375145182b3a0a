"""MIPO, the method (Nam, Li, Jaques, arXiv 2603.19294, section 3; docs/walkthrough.md steps 2-6 and 14): preference
pairs sampled from the base model itself, and the pointwise mutual information that DPO on them raises.

For each training prompt x the base model samples y+ ~ pi(.|x); the negative y- is the same model's response to
another prompt x' (three kinds: plan_negatives below). Both are stored under the
ORIGINAL prompt: (prompt=x, chosen=y+, rejected=y-). DPO on these pairs maximizes log pi(y|x) - log pi(y|x'), which
pointwise_mi measures. This file builds pairs and measures; the loss is dpo_loss.py's, the loop train.py's, and the
pairs file is TRL's conversational preference format (formats/pairs_file.py).

    python mipo.py --model qwen --task persona --n 32
"""
import argparse
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

import sampler
from dpo_loss import token_logps
from model_loader import free_memory, load_model
from sampler import Sampling
from tasks import (DATA_SEED, NEGATIVES, TASKS, Example, Task, compare_responses, default_sampling, get_task,
                   load_examples, prompt_messages)
from formats import pairs_file
from formats.dtypes import AUTO_DTYPE, DTYPES, torch_dtype
from formats.files import MipoError, append_jsonl, check_out, run_command, write_atomically
from formats.hf_files import TRANSFORMERS_SAMPLING_DEFAULTS, generation_defaults
from formats.model_sources import local_model, resolve_model_dir

# ---------------------------------------------------------------------------------------------------
# Negatives: the prompt x' whose response becomes the rejected answer for x.
#   random           x' = another training prompt; y- is the positive already sampled for it (one sampling pass)
#   incomplete       y- ~ pi(.|x'), x' = x without its user context (personalization) or one sentence (math)
#   random-resample  y- ~ pi(.|x'), x' = another prompt, or the same request under another user's context
# ---------------------------------------------------------------------------------------------------

def derangement(keys: list[str], rng: random.Random) -> list[int]:
    """donor[i] for every i: a random permutation with no item its own donor, nor one whose prompt (keys) equals its
    own. The official code's plain shuffle can pair a prompt with itself: a second positive, a pair that teaches
    nothing."""
    n = len(keys)
    if n < 2:
        raise MipoError(f"--negative random needs at least 2 prompts (got {n}); raise --n")
    most, count = Counter(keys).most_common(1)[0]
    if 2 * count > n:  # more than half share one prompt: some of them would have to be paired with each other
        raise MipoError(f"--negative random: {count} of the {n} prompts are the same ({most[:60]!r}), so they cannot "
                        "all get a different prompt as their negative; remove the duplicates or raise --n")
    donor = list(range(n))
    rng.shuffle(donor)
    for i in range(n):  # repair: swap each clashing donor with one that suits both positions
        while keys[donor[i]] == keys[i]:
            j = rng.randrange(n)
            if keys[donor[j]] != keys[i] and keys[donor[i]] != keys[j]:
                donor[i], donor[j] = donor[j], donor[i]
    return donor


def negative_example(
    task: Task, ex: Example, kind: str, donor: Example | None, rng: random.Random
) -> tuple[Example, str]:
    """x' for x, and where it came from (the donor's id, 'no context', or the dropped sentence)."""
    if kind == "random":
        return donor, donor.id  # another training prompt altogether; its positive becomes x's negative
    if kind == "random-resample":
        if ex.context:  # personalization: the same request, another user's context
            return replace(ex, context=donor.context), donor.id
        return donor, donor.id
    if kind == "incomplete":
        if ex.context:
            return replace(ex, context=""), "no context"
        if task.drops_sentence:
            question, dropped = drop_one_sentence(ex.question, rng)
            return replace(ex, question=question), f"dropped sentence: {dropped}"
        raise MipoError(
            f"--negative incomplete: {task.name} item {ex.id} has no user context to remove; use --negative random"
        )
    raise MipoError(f"--negative {kind}: must be one of {', '.join(NEGATIVES)}")


def drop_one_sentence(question: str, rng: random.Random) -> tuple[str, str]:
    """The math 'incomplete prompt', by the paper's gsm.py: split at every ".", one part before the last (the
    question) dropped at random, the rest joined with "." again. A plain split, as the paper's ("$1.50" is two
    parts). -> (x', the dropped part); a problem without a "." has nothing to drop (load_gsm8k skips it)."""
    parts = question.split(".")
    if len(parts) < 2:
        raise MipoError(f"cannot drop a sentence from a problem without a '.': {question[:60]!r}; "
                        "use --negative random")
    k = rng.randrange(len(parts) - 1)
    remaining = parts[:k] + parts[k + 1:-1]
    return (".".join(remaining) + "." + parts[-1]).strip(), parts[k].strip()


def plan_negatives(
    task: Task, examples: list[Example], negative: str, seed: int
) -> list[tuple[Example, str, int | None]]:
    """(x', its source, the donor's index or None) for every x, fixed by the seed before any sampling."""
    if len({ex.id for ex in examples}) != len(examples):
        raise MipoError(f"task {task.name}: example ids are not unique")
    donors = [None] * len(examples)
    if negative == "random":  # the donor's whole prompt must differ from x
        donors = derangement([task.render(ex) for ex in examples], random.Random(seed))
    elif negative == "random-resample":  # the donor's context replaces x's where x has one
        donors = derangement([ex.context or task.render(ex) for ex in examples], random.Random(seed))
    plan = []
    for ex, d in zip(examples, donors):
        x_prime, source = negative_example(
            task, ex, negative, examples[d] if d is not None else None, random.Random(f"{seed}-{ex.id}")
        )
        plan.append((x_prime, source, d))
    return plan


# ---------------------------------------------------------------------------------------------------
# Sampling the pairs: y+ from x, y- from x', both stored under x. The file, and resuming it: formats/pairs_file.py.
# ---------------------------------------------------------------------------------------------------

def build_pairs(model, tokenizer, task: Task, examples: list[Example], out_path, negative: str, sampling: Sampling,
                seed: int = 0, batch_size: int = 16, model_name: str = "", progress: bool = True) -> list[dict]:
    """One positive (from x) and one negative (from x') per example, written to out_path and returned. Resumable;
    a complete pairs file of the same run is returned as it is."""
    sampling = resolve_sampling(sampling, model)
    settings = sampling_settings(sampling, seed, model_name)
    pairs = pairs_file.read_complete_pairs(out_path, task, examples, negative, settings)
    if pairs is not None:
        return pairs
    path = pairs_file.samples_path(out_path)
    sample_pairs(model, tokenizer, task, examples, path, negative, sampling, seed, batch_size, model_name, progress)
    return write_pairs(task, examples, [path], out_path, negative, seed)


def sample_pairs(model, tokenizer, task: Task, examples: list[Example], path, negative: str, sampling: Sampling,
                 seed: int = 0, batch_size: int = 16, model_name: str = "", progress: bool = True,
                 shard: tuple[int, int] = (0, 1)) -> None:
    """Every response the pairs need, into the samples file `path`, one line per x: y+ ~ pi(.|x), and y- ~ pi(.|x')
    unless y- is another prompt's positive (--negative random). Each batch of prompts has its own seed, so a resumed
    run writes what an uninterrupted one would. shard=(rank, world): every world-th batch from the rank-th."""
    plan = plan_negatives(task, examples, negative, seed)
    sample_negatives = negative != "random"
    sampling = resolve_sampling(sampling, model)  # what the flags left to the model, from the model
    settings = sampling_settings(sampling, seed, model_name)
    with append_jsonl(path, "pairs") as (records, write):  # what an interrupted run sampled, and a writer after it
        done = pairs_file.resume_samples(path, records, tokenizer, task, negative, settings)
        positives, negatives = encode_prompts(model, tokenizer, task, examples, plan, sampling.max_new_tokens)
        rank, world = shard
        todo = [start for start in range(rank * batch_size, len(examples), world * batch_size)
                if any(ex.id not in done for ex in examples[start:start + batch_size])]
        for b, start in enumerate(todo):
            batch = range(start, min(start + batch_size, len(examples)))
            # One sampling call per batch, with the batch's own seed: the positives, then the negatives if sampled.
            prompts = [positives[i] for i in batch] + ([negatives[i] for i in batch] if sample_negatives else [])
            responses = sample_responses(model, tokenizer, prompts, sampling, seed * 1_000_003 + start, len(prompts))
            new = []
            for k, i in enumerate(batch):
                if examples[i].id in done:
                    continue
                record = {"id": examples[i].id, "task": task.name, "negative": negative, "sampling": settings}
                record["chosen"], record["chosen_stopped"] = responses[k]
                if sample_negatives:
                    record["rejected"], record["rejected_stopped"] = responses[len(batch) + k]
                new.append(record)
                done.add(examples[i].id)
            write(new)  # one complete line per prompt, on disk before the next batch
            if progress:
                print(f"pairs: {len(done)}/{len(examples)} prompts sampled (batch {b + 1}/{len(todo)})",
                      file=sys.stderr, flush=True)


def encode_prompts(
    model, tokenizer, task: Task, examples: list[Example], plan: list, max_new_tokens: int
) -> tuple[list, list]:
    """Both prompts of every pair as token ids, x and x'; one too long for the model fails here, before sampling."""
    positives = [tokenizer.apply_chat_template(prompt_messages(task, ex)) for ex in examples]
    negatives = [tokenizer.apply_chat_template(prompt_messages(task, x_prime)) for x_prime, _, _ in plan]
    limit = model.config.max_position_embeddings
    for ex, pos, neg, (_, source, _) in zip(examples, positives, negatives, plan):
        for ids, which in ((pos, "prompt"), (neg, f"negative prompt ({source})")):
            if len(ids) + max_new_tokens > limit:
                raise MipoError(
                    f"{task.name} item {ex.id}: {which} of {len(ids)} tokens + --max-new-tokens {max_new_tokens} "
                    f"exceeds the model's context window of {limit} tokens; "
                    "lower --max-new-tokens or shorten the prompt"
                )
    return positives, negatives


def sample_responses(model, tokenizer, prompts: list[list[int]], sampling: Sampling, seed: int, batch_size: int,
                     progress: bool = False) -> list[tuple[str, bool]]:
    """One response per prompt (token ids) as (text, stopped): every sampling call of the project goes through here,
    with the settings in force (resolve_sampling)."""
    sampling = resolve_sampling(sampling, model)
    completions = sampler.generate(model, prompts, **sampler.generate_kwargs(sampling),
                                   stop_token_ids=tokenizer.stop_token_ids, seed=seed, batch_size=batch_size,
                                   progress=progress)
    return [response_text(tokenizer, tokens) for tokens in completions]


def resolve_sampling(sampling: Sampling, model) -> Sampling:
    """sampling with what it leaves to the model (None) taken from the model's generation_config.json, as
    transformers' generate does (formats/hf_files.py). model: a loaded model, or what --model names."""
    if sampling.top_k is not None and sampling.repetition_penalty is not None:
        return sampling
    if isinstance(model, (str, Path)):
        defaults = generation_defaults(resolve_model_dir(model))
    else:
        defaults = getattr(model, "generation_defaults", TRANSFORMERS_SAMPLING_DEFAULTS)
    return replace(sampling, **{k: v for k, v in defaults.items() if getattr(sampling, k) is None})


def sampling_settings(sampling: Sampling, seed: int, model_name: str) -> dict:
    """What every pairs and samples record keeps of the run that sampled it: the settings in force, seed, model."""
    return {**sampler.generate_kwargs(sampling), "seed": seed, "model": model_name}


def response_text(tokenizer, tokens: list[int]) -> tuple[str, bool]:
    """(text, stopped) of sampled ids; a final stop token is cut (the chat template writes it when scoring)."""
    stopped = bool(tokens) and tokens[-1] in tokenizer.stop_token_ids
    return tokenizer.decode(tokens[:-1] if stopped else tokens), stopped


def write_pairs(
    task: Task, examples: list[Example], sample_files: list, out_path, negative: str, seed: int
) -> list[dict]:
    """The pairs, from the samples files, written to out_path at once: (prompt=x, chosen=y+, rejected=y-)."""
    samples = {record["id"]: record for path in sample_files for record in pairs_file.read_pairs(path)}
    missing = [ex.id for ex in examples if ex.id not in samples]
    if missing:
        raise MipoError(
            f"{sample_files[0]}: no samples for {len(missing)} prompt(s), e.g. {missing[0]!r}; "
            "run the same command again to sample them"
        )
    pairs = []
    for ex, (x_prime, source, donor) in zip(examples, plan_negatives(task, examples, negative, seed)):
        positive = samples[ex.id]
        if donor is not None and negative == "random":  # the donor's own positive, reused as x's negative
            rejected, rejected_stopped = (
                samples[examples[donor].id]["chosen"], samples[examples[donor].id]["chosen_stopped"]
            )
        else:
            rejected, rejected_stopped = positive["rejected"], positive["rejected_stopped"]
        pairs.append({
            "id": ex.id, "task": task.name,
            "prompt": prompt_messages(task, ex),
            "chosen": [{"role": "assistant", "content": positive["chosen"]}],
            # The heart of MIPO: the negative's response is stored under the ORIGINAL prompt x.
            "rejected": [{"role": "assistant", "content": rejected}],
            "negative": negative, "negative_source": source, "negative_prompt": prompt_messages(task, x_prime),
            "chosen_stopped": positive["chosen_stopped"], "rejected_stopped": rejected_stopped,
            "sampling": positive["sampling"],
        })
    write_atomically(Path(out_path), "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs))
    for path in sample_files:
        Path(path).unlink()
    return pairs


def pair_stats(pairs: list[dict]) -> dict:
    """The share of responses cut at --max-new-tokens, per side (a pair with one side cut also teaches 'stop')."""
    n = max(1, len(pairs))
    return {
        "pairs": len(pairs),
        "chosen_truncated": sum(not p.get("chosen_stopped", True) for p in pairs) / n,
        "rejected_truncated": sum(not p.get("rejected_stopped", True) for p in pairs) / n,
        "either_truncated": sum(not (p.get("chosen_stopped", True) and p.get("rejected_stopped", True))
                                for p in pairs) / n,
    }


# ---------------------------------------------------------------------------------------------------
# Pointwise mutual information, the quantity MIPO maximizes, as a meter (docs/walkthrough.md, step 14): the BASE
# model's log pi_ref(y|x) - log pi_ref(y|x') for a model's own responses y (pmi). Scored by the trained model itself
# (pmi_self) it also rises when a model merely grows more confident: no evidence alone.
# ---------------------------------------------------------------------------------------------------


def encode_turn(tokenizer, messages: list[dict], response: str, stopped: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one chat turn, both cut from the template's rendering of the whole
    conversation; the response ends with its end-of-turn token only when the sample stopped by itself."""
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], add_generation_prompt=False
    )
    if full[:len(prompt_ids)] != prompt_ids:
        raise MipoError(
            "chat template: the rendered conversation does not start with the rendered prompt; "
            "this template is not supported"
        )
    response_ids = full[len(prompt_ids):]
    stop_ids = set(tokenizer.stop_token_ids)
    end = next((k for k, t in enumerate(response_ids) if t in stop_ids), len(response_ids))
    return prompt_ids, response_ids[:end + 1] if stopped else response_ids[:end]


@torch.no_grad()
def response_logps(
    model, rows: list[tuple[list[int], list[int]]], batch_size: int = 8, progress: bool = False, per_token: bool = False
):
    """Summed log p(response | prompt) of each (prompt ids, response ids) row: (N,) float32; per_token: also each
    row's terms log p(y_t | prompt, y_<t), (len(response),) float32 each, whose sum it is. Longest rows first (little
    padding); only positions that score a response token reach the output projection and the log-softmax.
    Shapes: B rows in a batch, T tokens, R response tokens of the batch, V vocabulary."""
    device = model.lm_head.weight.device
    out = torch.zeros(len(rows))  # an empty response (no token at all) has log-prob 0 under any prompt
    terms = [torch.zeros(0)] * len(rows)
    scored = sorted((i for i, (_, r) in enumerate(rows) if r), key=lambda i: -len(rows[i][0]) - len(rows[i][1]))
    for start in tqdm(
        range(0, len(scored), batch_size), desc="log-probs", unit="batch", disable=not progress, leave=False
    ):
        batch = scored[start:start + batch_size]
        T = len(rows[batch[0]][0]) + len(rows[batch[0]][1])  # the longest row comes first
        # Right padding: real tokens never attend to the pads after them, so a plain causal forward is exact.
        input_ids = torch.zeros(len(batch), T, dtype=torch.long)  # (B, T)
        row_of, position = [], []  # (R,) each: the logits at (row, position t) score the token at t + 1
        for b, i in enumerate(batch):
            p, r = rows[i]
            input_ids[b, :len(p) + len(r)] = torch.tensor(p + r)
            row_of += [b] * len(r)
            position += range(len(p) - 1, len(p) + len(r) - 1)
        input_ids = input_ids.to(device)
        row_of, position = torch.tensor(row_of, device=device), torch.tensor(position, device=device)
        logits = model(input_ids, logits_index=(row_of, position))  # (R, V)
        token_logp = token_logps(logits, input_ids[row_of, position + 1])  # (R,) float32
        out[batch] = torch.zeros(len(batch), device=device).index_add_(0, row_of, token_logp).cpu()
        if per_token:  # the same terms before the sum, split by row (row_of runs through the batch in order)
            for i, row_terms in zip(batch, token_logp.cpu().split([len(rows[i][1]) for i in batch])):
                terms[i] = row_terms
    return (out, terms) if per_token else out


def pointwise_mi(model, tokenizer, responses: list[tuple[list[dict], list[dict], str, bool]], batch_size: int = 8,
                 progress: bool = False) -> tuple[list[float], list[int], list[tuple[list[int], list | None]]]:
    """log p(y|x) - log p(y|x') under `model`, summed over y's tokens, for each (x, x', y, stopped) (x, x' chat
    messages, y text, stopped: y ended by itself), each y's length in tokens, and y per token: its ids and the terms
    log p(y_t|x, y_<t) - log p(y_t|x', y_<t) of the sum, from the same forward passes (None where the chat template
    cuts y into other tokens under x'). x' another prompt: the MI log p(y|x) - log p(y); x' = x without its context
    c: the conditional form log p(y|x,c) - log p(y|x)."""
    rows = []
    for x, x_prime, text, stopped in responses:
        rows += [encode_turn(tokenizer, x, text, stopped), encode_turn(tokenizer, x_prime, text, stopped)]
    sums, terms = response_logps(model, rows, batch_size, progress, per_token=True)
    logps = sums.view(len(responses), 2)  # (responses, x | x')
    per_token = [(rows[2 * k][1], (terms[2 * k] - terms[2 * k + 1]).tolist() if rows[2 * k][1] == rows[2 * k + 1][1]
                  else None) for k in range(len(responses))]
    return (logps[:, 0] - logps[:, 1]).tolist(), [len(rows[2 * k][1]) for k in range(len(responses))], per_token


def mi_meter(model, tokenizer, responses: list[tuple[list[dict], list[dict], str, bool]], batch_size: int = 8) -> dict:
    """Means over responses (x, x', y, stopped) under `model`: pmi, pmi_per_token (each response's over its length:
    the sum grows with the length), length, the share cut at max_new_tokens; per_response for paired comparisons,
    with each response's ids and its terms per token (pointwise_mi)."""
    if not responses:
        raise MipoError("mi_meter: no responses")
    values, lengths, terms = pointwise_mi(model, tokenizer, responses, batch_size)
    n = len(responses)
    per_token = [value / length for value, length in zip(values, lengths) if length]
    return {"pmi": sum(values) / n, "pmi_per_token": sum(per_token) / max(1, len(per_token)),
            "length": sum(lengths) / n, "truncated": sum(not r[3] for r in responses) / n, "pairs": n,
            "per_response": [{"pmi": value, "length": length, "ids": ids, "pmi_tokens": pmi_tokens}
                             for value, length, (ids, pmi_tokens) in zip(values, lengths, terms)]}


METER_SEED = DATA_SEED  # fixes x' of the meter: every model and every run is metered against the same x'


def meter_rows(task: Task, examples: list[Example], responses: list[tuple[str, bool]]) -> list[tuple]:
    """(x, x', y, stopped) per example, y its response (text, stopped) and x' drawn with the task's own negative and
    METER_SEED: for the items alone, not a run's --negative or --seed, so train.py's meter and eval.py's agree."""
    plan = plan_negatives(task, examples, task.negative, METER_SEED)
    return [(prompt_messages(task, ex), prompt_messages(task, x_prime), text, stopped)
            for ex, (x_prime, _, _), (text, stopped) in zip(examples, plan, responses)]


@torch.no_grad()
def held_out_meter(model, tokenizer, task: Task, examples: list[Example], responses: list[tuple[str, bool]]) -> dict:
    """mi_meter of one response (text, stopped) per held-out example, the task's metric, each item's numbers, and
    per_token: each response's ids and its terms per token."""
    was_training = model.training
    model.eval()
    meter = mi_meter(model, tokenizer, meter_rows(task, examples, responses))
    model.train(was_training)
    items, scores, terms = [], {}, []
    for ex, (text, stopped), mi in zip(examples, responses, meter.pop("per_response")):
        terms.append({"id": ex.id, "ids": mi.pop("ids"), "pmi_tokens": mi.pop("pmi_tokens")})
        task_scores = task.score(ex, text)
        for metric, value in task_scores.items():
            scores.setdefault(metric, []).append(value)
        per_token = mi["pmi"] / mi["length"] if mi["length"] else None
        items.append({"id": ex.id, "metrics": {**mi, "pmi_per_token": per_token, "truncated": float(not stopped),
                                               **task_scores}})
    return {**meter, "task": {metric: sum(v) / len(v) for metric, v in scores.items()}, "items": items,
            "per_token": terms}


def trained_meter(load, trained, base, task: Task, examples: list[Example], sampling: Sampling, seed: int,
                  batch_size: int) -> dict:
    """The meter MIPO's claim is about: the trained model samples its own response to each held-out prompt (the
    base model's settings and seed), the BASE model scores them (pmi); pmi_self is the trained model's own score.
    load(name) -> (model, tokenizer) is the caller's loader; one model is in memory at a time."""
    policy, tokenizer = load(trained)
    prompts = [tokenizer.apply_chat_template(prompt_messages(task, ex)) for ex in examples]
    own = sample_responses(policy, tokenizer, prompts, sampling, seed, batch_size)
    pmi_self = held_out_meter(policy, tokenizer, task, examples, own)["pmi"]
    del policy
    free_memory()  # now, before the base model loads
    reference, tokenizer = load(base)
    return {**held_out_meter(reference, tokenizer, task, examples, own), "pmi_self": pmi_self}


# ---------------------------------------------------------------------------------------------------
# Command line: python mipo.py --model qwen --task persona --n 32. The sampling flags are train.py's and eval.py's too.
# ---------------------------------------------------------------------------------------------------


def add_sampling_flags(parser: argparse.ArgumentParser, title: str, many: dict | None = None):
    """The sampling flags of all three command lines; one left out takes the task's value. many: train.py's."""
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
    g.add_argument("--compile", action="store_true", help="sample with a torch.compile'd decode step over a static "
                   "KV cache (CUDA graphs on a GPU): the same tokens as without it; off by default until measured on "
                   "a GPU (docs/performance.md)")
    return g


def sampling_from_flags(args, base: Sampling) -> Sampling:
    """base with the sampling flags that were given (None stays the model's: resolve_sampling)."""
    given = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
             "top_k": args.top_k, "repetition_penalty": args.repetition_penalty}
    s = replace(base, **{k: v for k, v in given.items() if v is not None})
    if s.temperature < 0 or not 0 < s.top_p <= 1 or (s.top_k is not None and s.top_k < 0) or s.max_new_tokens < 1 \
            or (s.repetition_penalty is not None and not s.repetition_penalty > 0):
        raise MipoError(f"sampling {asdict(s)}: need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0, "
                        "--max-new-tokens >= 1, --repetition-penalty > 0")
    return s


SPEEDUPS_OFF = "MIPO_CPU_SPEEDUPS=0 in the environment switches off every CPU speed-up (transforms/cpu_speedups.py)."


def pairs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Build MIPO preference pairs: positives from x, negatives from x', "
                                                 "stored under x.", epilog=SPEEDUPS_OFF)
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
    """mipo.py's flags, checked -> (task, kind of negative, sampling settings, pairs file)."""
    task = get_task(args.task)
    if args.batch_size < 1:
        raise MipoError(f"--batch-size {args.batch_size}: must be at least 1")
    negative = args.negative or task.negative
    out = Path(args.out or f"runs/pairs-{task.name}-{negative}.jsonl")
    check_out(out, is_dir=False)
    return task, negative, sampling_from_flags(args, default_sampling(task, args.device)), out


def main(argv=None) -> None:
    from transforms import cpu_speedups  # the command's own speed-ups, switched on in the open as train.py's

    args = pairs_parser().parse_args(argv)
    task, negative, sampling, out = task_settings(args)
    examples = load_examples(task, "train", args.n, args.data)

    args.model = local_model(args.model, args.revision)  # a hub name: downloaded now, then a local directory
    model, tokenizer = load_model(args.model, args.device, torch_dtype(args.dtype, args.device))
    cpu_speedups.apply(model)
    model.compile_decode = args.compile  # sampler.generate reads it
    sampling = resolve_sampling(sampling, model)  # the flags and the task leave top-k and the penalty to it
    print(f"{task.name}: {len(examples)} prompts, --negative {negative}, {asdict(sampling)} -> {out}", file=sys.stderr)
    print(cpu_speedups.plan_line(args.device), file=sys.stderr)
    t0 = time.time()
    pairs = build_pairs(
        model, tokenizer, task, examples, out, negative, sampling, args.seed, args.batch_size, args.model
    )
    stats = pair_stats(pairs)
    print(f"{len(pairs)} pairs in {out} ({time.time() - t0:.0f} s); cut at --max-new-tokens {sampling.max_new_tokens}: "
          f"chosen {stats['chosen_truncated']:.0%}, rejected {stats['rejected_truncated']:.0%}, "
          f"either {stats['either_truncated']:.0%}")
    for metric, (chosen, rejected) in compare_responses(task, examples, pairs).items():
        print(f"  {metric:<22} chosen {chosen:.3f}   rejected {rejected:.3f}")


if __name__ == "__main__":
    run_command(main)
