"""MIPO, the method (Nam, Li, Jaques, "Maximizing Mutual Information Between Prompt and Response Improves
LLM Performance With No Additional Data", arXiv 2603.19294): preference pairs sampled from the base model
itself, and the pointwise mutual information that DPO on them raises.

For each training prompt x the base model samples a positive y+ ~ pi(.|x); the negative y- is a response of
the same model to a different prompt x' (the MIPO paper's contrastive pairs):
  random           x' = another training prompt, and y- is the positive already sampled for it (math,
                   multiple choice: one sampling pass, as the official code);
  incomplete       y- ~ pi(.|x'), x' = x with the user context removed (personalization), or with one
                   sentence of the problem dropped (math);
  random-resample  y- ~ pi(.|x'), x' = another prompt, or the same request under another user's context.
Both responses are stored under the ORIGINAL prompt: (prompt=x, chosen=y+, rejected=y-). One epoch of
DPO on these pairs, with the base model as reference, maximizes the pointwise mutual information
log pi(y|x) - log pi(y), pi(y|x') standing in for the marginal pi(y); with an incomplete prompt it is the
conditional form log pi(y|x,c) - log pi(y|x). `pointwise_mi` measures exactly that difference.
It builds pairs and measures; it does not train: the loss is dpo_loss.py's, the loop train.py's.

Nothing here is task-specific: a task (tasks.py) gives the prompts x, the template and the checker. The pairs
file is TRL's conversational preference format (plumbing/pairs_file.py).

    python mipo.py --model qwen --task persona --n 32
"""
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
from model_loader import load_model
from sampler import Sampling
from tasks import NEGATIVES, Example, Task, compare_responses, load_examples, prompt_messages
from plumbing import config, cpu_speedups, pairs_file
from plumbing.files import MipoError, append_jsonl, run_command, write_atomically
from plumbing.model_sources import local_model


# ---------------------------------------------------------------------------------------------------
# Negatives: the prompt x' whose response becomes the rejected answer for x (the three kinds: above).
# ---------------------------------------------------------------------------------------------------

def derangement(keys: list[str], rng: random.Random) -> list[int]:
    """donor[i] for every i: a random permutation in which no item is its own donor, nor a donor whose
    prompt content (keys) equals its own. The official code paired prompts by a plain shuffle, which
    can pair a prompt with itself: the 'negative' is then a second positive and the pair teaches nothing."""
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
    """The math 'incomplete prompt', by the paper's rule (its gsm.py): the problem is split at every ".", one part
    before the last is dropped at random, and the rest is joined again with "." (the last part, the question itself,
    always stays), so the model answers the same question with a fact missing. The split is a plain one: "$1.50" is
    two parts, and a problem with two parts becomes ". " + its question, as in the paper. Returns (x', the dropped
    part); a problem without a "." has nothing to drop (the paper skips it, as load_gsm8k does)."""
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
# Sampling the pairs: y+ from x, y- from x', both stored under x. The file, and resuming it: plumbing/pairs_file.py.
# ---------------------------------------------------------------------------------------------------

def build_pairs(model, tokenizer, task: Task, examples: list[Example], out_path, negative: str, sampling: Sampling,
                seed: int = 0, batch_size: int = 16, model_name: str = "", progress: bool = True) -> list[dict]:
    """Sample one positive (from x) and one negative (from x') per example and write the pairs to out_path.
    Resumable (sample_pairs); a complete pairs file of the same run is returned as it is. Returns every pair."""
    sampling = config.resolve_sampling(sampling, model)
    settings = pairs_file.sampling_settings(sampling, seed, model_name)
    pairs = pairs_file.read_complete_pairs(out_path, task, examples, negative, settings)
    if pairs is not None:
        return pairs
    path = pairs_file.samples_path(out_path)
    sample_pairs(model, tokenizer, task, examples, path, negative, sampling, seed, batch_size, model_name, progress)
    return write_pairs(task, examples, [path], out_path, negative, seed)


def sample_pairs(model, tokenizer, task: Task, examples: list[Example], path, negative: str, sampling: Sampling,
                 seed: int = 0, batch_size: int = 16, model_name: str = "", progress: bool = True,
                 shard: tuple[int, int] = (0, 1)) -> None:
    """Sample every response the pairs need into the samples file `path`, one line per prompt x: y+ ~ pi(.|x), and
    y- ~ pi(.|x') unless the negative is another prompt's positive (--negative random). Prompts go in batches of
    batch_size, each with its own seed, so an interrupted run, started again, writes what an uninterrupted run
    would have. shard=(rank, world): sample only every world-th batch, from the rank-th, so that world processes
    together sample exactly what one process samples."""
    plan = plan_negatives(task, examples, negative, seed)
    sample_negatives = negative != "random"
    sampling = config.resolve_sampling(sampling, model)  # what the flags left to the model, from the model
    settings = pairs_file.sampling_settings(sampling, seed, model_name)
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
    """Both prompts of every pair as token ids, x and x'; a prompt too long for the model fails here, before any
    sampling."""
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
    with the settings in force (what the flags left to the model taken from it, config.resolve_sampling)."""
    sampling = config.resolve_sampling(sampling, model)
    completions = sampler.generate(model, prompts, **sampler.generate_kwargs(sampling),
                                   stop_token_ids=tokenizer.stop_token_ids, seed=seed, batch_size=batch_size,
                                   progress=progress)
    return [response_text(tokenizer, tokens) for tokens in completions]


def response_text(tokenizer, tokens: list[int]) -> tuple[str, bool]:
    """(text, stopped) of sampled token ids: stopped when the last one is a stop token, which is cut from the text
    (the chat template writes the end of turn itself when the response is scored)."""
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
    """The share of responses cut at --max-new-tokens, per side: a pair with one cut side and one stopped side
    teaches 'stop' (the end-of-turn token) as much as it teaches the prompt."""
    n = max(1, len(pairs))
    return {
        "pairs": len(pairs),
        "chosen_truncated": sum(not p.get("chosen_stopped", True) for p in pairs) / n,
        "rejected_truncated": sum(not p.get("rejected_stopped", True) for p in pairs) / n,
        "either_truncated": sum(not (p.get("chosen_stopped", True) and p.get("rejected_stopped", True))
                                for p in pairs) / n,
    }


# ---------------------------------------------------------------------------------------------------
# Pointwise mutual information: the quantity MIPO maximizes, as a meter for training and evaluation.
# MIPO's claim is about the BASE model: DPO on the pairs raises log pi_ref(y|x) - log pi_ref(y|x') for the
# trained model's responses y. The same difference scored by the trained model itself also rises when the
# model merely grows more confident, so it is reported under another name (pmi_self) and is no evidence alone.
# ---------------------------------------------------------------------------------------------------


def encode_turn(tokenizer, messages: list[dict], response: str, stopped: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one chat turn, both cut from the template's rendering of the whole
    conversation so the response tokens are those the chat format puts there. The response keeps its
    end-of-turn token when the sample stopped and has none when it was cut at max_new_tokens."""
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
    model, rows: list[tuple[list[int], list[int]]], batch_size: int = 8, progress: bool = False
) -> torch.Tensor:
    """Summed log p(response | prompt) of each (prompt ids, response ids) row, float32, shape (N,).
    Rows are scored longest first, so a batch pads little, and only the positions that score a response token
    go through the output projection and the log-softmax (a prompt's own positions never need the 152k-row
    projection). Shapes: B rows in a batch, T tokens, R response tokens of the batch, V vocabulary."""
    device = model.lm_head.weight.device
    out = torch.zeros(len(rows))  # an empty response (no token at all) has log-prob 0 under any prompt
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
    return out


def pointwise_mi(model, tokenizer, responses: list[tuple[list[dict], list[dict], str, bool]], batch_size: int = 8,
                 progress: bool = False) -> tuple[list[float], list[int]]:
    """log p(y|x) - log p(y|x') under `model`, summed over the response tokens, for each (x, x', y, stopped) (x and
    x' as chat messages, y the response text, stopped: whether y ended by itself), and the length of each y in
    tokens. With y ~ pi(.|x) and x' another prompt it estimates the MI log p(y|x) - log p(y); with x' = x without
    its context c, the conditional form log p(y|x,c) - log p(y|x). Pass the base model to measure what MIPO raises."""
    rows = []
    for x, x_prime, text, stopped in responses:
        rows += [encode_turn(tokenizer, x, text, stopped), encode_turn(tokenizer, x_prime, text, stopped)]
    logps = response_logps(model, rows, batch_size, progress).view(len(responses), 2)  # (responses, x | x')
    return (logps[:, 0] - logps[:, 1]).tolist(), [len(rows[2 * k][1]) for k in range(len(responses))]


def mi_meter(model, tokenizer, responses: list[tuple[list[dict], list[dict], str, bool]], batch_size: int = 8) -> dict:
    """The held-out meter of one model's responses (x, x', y, stopped): the mean pointwise MI under `model` (the
    base model for the number MIPO claims to raise), the mean of each response's MI over its length in tokens (the
    sum grows with the length; this does not), the responses' mean length and the share of them cut at
    max_new_tokens; per_response: each response's pointwise MI and length, for paired comparisons."""
    if not responses:
        raise MipoError("mi_meter: no responses")
    values, lengths = pointwise_mi(model, tokenizer, responses, batch_size)
    n = len(responses)
    per_token = [value / length for value, length in zip(values, lengths) if length]
    return {"pmi": sum(values) / n, "pmi_per_token": sum(per_token) / max(1, len(per_token)),
            "length": sum(lengths) / n, "truncated": sum(not r[3] for r in responses) / n, "pairs": n,
            "per_response": [{"pmi": value, "length": length} for value, length in zip(values, lengths)]}


def meter_rows(task: Task, examples: list[Example], responses: list[tuple[str, bool]], negative: str,
               seed: int) -> list[tuple]:
    """(x, x', y, stopped) per example for pointwise_mi and mi_meter: y its response (text, stopped) and x' the
    negative prompt plan_negatives draws for (negative, seed), the x' of the example's pair when the pairs were
    built with the same negative and seed."""
    plan = plan_negatives(task, examples, negative, seed)
    return [(prompt_messages(task, ex), prompt_messages(task, x_prime), text, stopped)
            for ex, (x_prime, _, _), (text, stopped) in zip(examples, plan, responses)]


# ---------------------------------------------------------------------------------------------------
# Command line: python mipo.py --model qwen --task persona --n 32   (flags: config.pairs_parser)
# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = config.pairs_parser().parse_args(argv)
    task, negative, sampling, out = config.task_settings(args)
    examples = load_examples(task, "train", args.n, args.data)

    args.model = local_model(args.model, args.revision)  # a hub name: downloaded now, then a local directory
    model, tokenizer = load_model(args.model, args.device, config.torch_dtype(args.dtype, args.device))
    cpu_speedups.apply(model)
    sampling = config.resolve_sampling(sampling, model)  # the flags and the task leave top-k and the penalty to it
    print(f"{task.name}: {len(examples)} prompts, --negative {negative}, {asdict(sampling)} -> {out}", file=sys.stderr)
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
