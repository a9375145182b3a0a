"""eval.py: every metric on hand-made responses, the bootstrap on cases with a known answer, the judge's
score parser on messy replies, the MI meter against a full forward pass, `--compare` end to end on tiny
synthetic runs (table, cache, Markdown, plots), and bad input (one line, exit status 2, nothing written)."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import eval as evaluation
import mipo
import sampler
import tasks
from bookkeeping import report, results
from formats import files
from conftest import make_tiny_model
from model_loader import load_model, save_model
from formats.tokenizer import Tokenizer
from tasks import TASKS, Example
from formats.files import MipoError

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ tiny models and runs on disk

def write_tiny_model_dir(path: Path, seed: int = 0, soft: bool = False) -> Path:
    """A random qwen2-shaped model with a word-level tokenizer ('w0'..'w93', ChatML specials 94-96), saved in
    Hugging Face layout so that load_model, the sampler and the judge all run on it. soft: the output projection
    at its initial scale, so that samples vary (make_tiny_model sharpens it 20x)."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    path.mkdir(parents=True)
    vocab = {f"w{i}": i for i in range(94)}
    vocab.update({"<|im_start|>": 94, "<|im_end|>": 95, "<|endoftext|>": 96})
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tok.save(str(path / "tokenizer.json"))
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": chatml}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [95, 96]}))
    model = make_tiny_model("qwen2", seed=seed, max_position_embeddings=4096)
    if soft:
        with torch.no_grad():
            model.lm_head.weight.div_(20)
    return save_model(model, Tokenizer(path, model.config), path)


def write_run(path: Path, data: Path, seed: int) -> Path:
    """What train.py leaves: RUN/final (a model), RUN/metrics.jsonl (one dict per step), RUN/config.json (settings
    by section) and RUN/summary.json (the held-out MI meter before and after training)."""
    write_tiny_model_dir(path / files.RUN_FINAL, seed)
    steps = [{"step": s, "loss": 0.693 - 0.05 * s, "rewards/accuracies": 0.1 * s, "rewards/margins": 0.2 * s,
              "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s,
              "logps/chosen": -40 + s, "logps/rejected": -50 - s, "lr": 5e-7, "grad_norm": 1.0} for s in range(6)]
    (path / files.RUN_METRICS).write_text("".join(json.dumps(r) + "\n" for r in steps))
    (path / files.RUN_CONFIG).write_text(json.dumps({"pairs": {"model": "base", "task": "jsonl", "data": str(data)},
                                                         "loss": {"loss": "sigmoid", "beta": 0.1}}))
    (path / files.RUN_SUMMARY).write_text(json.dumps({"base_eval": {"pmi": 1.5, "pmi_self": 1.5, "pairs": 4},
                                                          "trained_eval": {"pmi": 2.5, "pmi_self": 3.0, "pairs": 4}}))
    return path


def write_user_file(path: Path) -> Path:
    """Twenty users with stated preferences and a numeric answer (the jsonl task: judged and exact-matched); every
    fifth, u4, u9, u14 and u19, is held out."""
    rows = [{"id": f"u{i}", "prompt": f"w{i + 1} w{i + 2} w{i + 3}", "answer": str(i),
             "context": f"- w{i + 10} w{i + 11}\n- w{i + 20}"} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ task metrics on hand-made responses

def item(ex_id, **metrics):
    return {"id": ex_id, "response": "", "stopped": True, "metrics": metrics}


def test_gsm8k_exact_match_with_the_papers_extraction_and_its_fallback():
    ex = Example("g", "How many?", "", "1,250")
    responses = {"5 + 3 = 8.\n#### 1250": 1.0,                # the '####' answer, the gold's separator ignored
                 "So the answer is 1,250 apples.": 0.0,        # no '####': not parsed, left to the fallback
                 "First 12, then 1250": 0.0,                   # likewise
                 "#### 1249\nQuestion: next #### 1250": 0.0,   # the first '####' counts
                 "I do not know.": 0.0}
    items = [item(f"r{k}", **evaluation.score_item(TASKS["gsm8k"], ex, r)) for k, r in enumerate(responses)]
    assert [it["metrics"]["correct"] for it in items] == list(responses.values())
    assert [it["metrics"]["parsed"] for it in items] == [1.0, 0.0, 0.0, 1.0, 0.0]
    summary = report.summarize(items)
    assert summary["correct"]["mean"] == pytest.approx(1 / 5) and summary["correct"]["n"] == 5


@pytest.mark.parametrize("task", ["arc", "mmlu"])
def test_multiple_choice_accuracy_is_the_letter_after_the_answer_is(task):
    ex = Example("q", "Which?", "", "B", {"choices": ["x", "y", "z"]})
    responses = ["It is y. The answer is: B", "The answer is (B).", "The answer is A, no wait, the answer is C", "B"]
    scores = [evaluation.score_item(TASKS[task], ex, r)["correct"] for r in responses]
    assert scores == [1.0, 1.0, 0.0, 0.0]  # the first 'the answer is' counts; a lone letter is not read


def test_persona_preferences_met_and_the_answer_guard():
    ex = Example("p", "What is the capital of France?", "- ...", "Paris",
                 {"rules": ["short", "bold"], "answers": ["Paris"]})
    both = evaluation.score_item(TASKS["persona"], ex, "The capital is **Paris**.")
    assert both == {"preferences_met": 1.0, "all_met": 1.0, "met_short": 1.0, "met_bold": 1.0, "answer_found": 1.0}
    degenerate = evaluation.score_item(TASKS["persona"], ex, "**Yes.**")  # follows both rules, answers nothing
    assert (degenerate["preferences_met"], degenerate["answer_found"]) == (1.0, 0.0)
    half = evaluation.score_item(TASKS["persona"], ex, " ".join(["Paris"] * 70))
    assert (half["preferences_met"], half["all_met"], half["answer_found"]) == (0.0, 0.0, 1.0)


def movielens_item(ex_id, shown, truth):
    context = "About me: ...\nSome movies I have rated (1 = hated it, 5 = loved it):\n" + "\n".join(
        f"- Movie {k} (1990) (Drama, War): {r}" for k, r in enumerate(shown))
    return Example(ex_id, "How would I rate X?", context, str(truth), {"user_id": 1})


def test_movielens_mae_and_exact_accuracy_next_to_the_users_mean_rating():
    task = TASKS["movielens"]
    cases = [(movielens_item("a", [4, 4, 5, 5], 5), "I liked war films. Rating: 3"),  # user mean 4.5 -> 5 (halves up)
             (movielens_item("b", [1, 2, 2, 3], 2), "Rating: 2"),                      # user mean 2.0
             (movielens_item("c", [3, 3, 3, 4], 1), "Probably a four.")]               # not parsed: out of the MAE
    items = [item(ex.id, **evaluation.score_item(task, ex, r)) for ex, r in cases]
    assert [it["metrics"]["abs_error"] for it in items] == [2.0, 0.0, None]
    summary = report.summarize(items)
    assert summary["abs_error"]["mean"] == pytest.approx(1.0) and summary["abs_error"]["n"] == 2
    assert summary["exact"]["mean"] == pytest.approx(1 / 3) and summary["parsed"]["mean"] == pytest.approx(2 / 3)
    assert summary["user_mean_abs_error"]["mean"] == pytest.approx((0.5 + 0.0 + 2.25) / 3)
    assert summary["user_mean_exact"]["mean"] == pytest.approx(2 / 3)
    # The regular expression reads the same lines load_movielens writes.
    assert evaluation.user_mean_rating(movielens_item("d", [1, 5], 3)) == 3.0


# ------------------------------------------------------------------ bootstrap intervals

def test_bootstrap_interval_on_a_fixed_seed():
    # Means of 4 draws from [0, 0, 0, 1]: P(0) = 0.32, P(<= 0.5) = 0.95, P(<= 0.75) = 0.996, so the 2.5% and
    # 97.5% quantiles are 0 and 0.75 with a wide margin for 2000 resamples.
    assert report.bootstrap_ci([0, 0, 0, 1]) == (0.0, 0.75)
    assert report.bootstrap_ci([0.25] * 9) == (0.25, 0.25)
    assert report.bootstrap_ci([1, 0, 1, 1, 0, 1]) == report.bootstrap_ci([1, 0, 1, 1, 0, 1])  # seeded
    assert report.bootstrap_ci(np.arange(50.0), seed=1) != report.bootstrap_ci(np.arange(50.0), seed=2)
    # Large n: the percentile interval of a proportion is the normal one, p +- 1.96 sqrt(p (1 - p) / n).
    values = np.array([1.0] * 120 + [0.0] * 280)
    low, high = report.bootstrap_ci(values)
    half_width = 1.96 * np.sqrt(0.3 * 0.7 / 400)
    assert low == pytest.approx(0.3 - half_width, abs=0.006) and high == pytest.approx(0.3 + half_width, abs=0.006)
    assert all(np.isnan(report.bootstrap_ci([])))


def test_differences_are_paired_by_item_id():
    difficulty = np.linspace(0, 1, 20)  # items differ a lot; the run is better by 0.1 on every one of them
    base = [item(f"i{k}", score=d) for k, d in enumerate(difficulty)]
    run = [item(f"i{k}", score=d + 0.1) for k, d in enumerate(difficulty)][::-1]  # another order: matched by id
    b, r = report.paired(base, run, "score")
    assert np.allclose(r - b, 0.1)
    assert report.bootstrap_ci(r - b) == pytest.approx((0.1, 0.1))
    low, high = report.bootstrap_ci(r)
    assert high - low > 0.2  # an unpaired interval could not tell the two models apart


def test_compare_rows_on_hand_made_results():
    base = [item("a", correct=1.0, pmi=2.0), item("b", correct=0.0, pmi=1.0), item("c", correct=1.0, pmi=3.0),
            item("d", correct=0.0, pmi=0.0)]
    run = [item("d", correct=1.0, pmi=1.0), item("c", correct=1.0, pmi=4.0), item("b", correct=1.0, pmi=2.0)]  # no "a"
    rows = {row["metric"]: row for row in report.compare_rows(base, [run])}
    assert list(rows) == ["correct", "pmi"]
    assert rows["correct"]["base"]["mean"] == 0.5 and rows["correct"]["runs"][0]["value"]["mean"] == 1.0
    diff = rows["correct"]["runs"][0]["diff"]  # on b, c, d: +1, 0, +1
    assert diff["mean"] == pytest.approx(2 / 3) and diff["n"] == 3
    assert (rows["pmi"]["runs"][0]["diff"]["mean"] == pytest.approx(1.0)
            and rows["pmi"]["runs"][0]["diff"]["ci"] == (1.0, 1.0))
    text = report.format_table(report.compare_rows(base, [run]), ["base", "run"], markdown=False)
    assert text.splitlines()[1].split()[:4] == ["correct", "0.500", "1.000", "+0.667"]
    markdown = report.format_table(report.compare_rows(base, [run]), ["base", "run"], markdown=True)
    assert markdown.splitlines()[0] == "| metric | base | run | diff [95% CI] |"
    assert "| pmi | 1.500 | 2.333 | +1.000 [+1.000, +1.000]* (n=3) |" in markdown


# ------------------------------------------------------------------ the judge

# The paper's judge prompt (prism.py of the official scripts), restated here letter for letter.
PAPER_JUDGE_SYSTEM = ("You are a helpful assistant, that evaluates another assistant's response based on how well the "
                      "response is personalized to this user based on their stated preference. Give a score between 1 "
                      "and 5, 1 if the response is general, and 5 if the response sufficiently addresses the user's "
                      "preference. Only respond with a number between 1 and 5 and do not provide an explanation.")


def test_the_judge_prompt_is_the_papers_verbatim():
    assert evaluation.JUDGE_SYSTEM == PAPER_JUDGE_SYSTEM
    assert (evaluation.JUDGE_USER.format(prompt="P", response="R", preference="F")
            == "User: P\n\nAssistant: R\n\nUser's preference: F")
    reader = evaluation.READER_SAMPLING["paper"]
    assert (reader.temperature, reader.top_p, reader.max_new_tokens) == (0.1, 0.9, 1024)


@pytest.mark.parametrize("reply, score", [  # the paper's reading: int(re.search(r'\d+', reply).group())
    ("4", 4),
    ("Score: 4\nThe response is a bulleted list.", 4),
    ("It has 2 bullets and 4 lines. Score: 5", 2),  # the first integer, wherever it stands
    ("Score: 3.5", 3),
    ("10/10, excellent", 10),                       # never clipped to 1-5
    ("-3 points", 3),
    ("The response follows the preference well.", None),
    ("", None),
])
def test_parse_judge_score_reads_the_first_integer_as_the_paper(reply, score):
    assert evaluation.parse_judge_score(reply) == score


class ByteTokenizer:
    """Chat messages as UTF-8 bytes (roles as "<role>" markers); id 256 ends a turn."""
    stop_token_ids = [256]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return list("".join(f"<{m['role']}>{m['content']}" for m in messages).encode())

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode()


def judge_fake(monkeypatch, replies):
    """sampler.generate answering each judge prompt by the stated preference it holds; records the calls."""
    calls = []

    def fake_generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, stop_token_ids=(), seed=0,
                      batch_size=None, progress=True, **options):
        calls.append({"prompts": [bytes(p).decode() for p in prompts], "temperature": temperature, "top_p": top_p,
                      "max_new_tokens": max_new_tokens, "seed": seed})
        rule = [next(r for r in replies if tasks.PREFERENCE_BY_ID[r][2] in t) for t in calls[-1]["prompts"]]
        return [list(replies[r].encode()) + [256] for r in rule]

    monkeypatch.setattr(sampler, "generate", fake_generate)
    return calls


def test_the_judge_sees_the_users_own_prompt_one_preference_and_skips_replies_without_an_integer(monkeypatch):
    calls = judge_fake(monkeypatch, {"short": "4", "bold": "2 out of 5", "formal": "No idea.", "question": "5"})
    task = TASKS["persona"]
    examples = [Example("x", "Q1?", "ctx", "", {"rules": ["short", "bold"], "answers": ["a"]}),
                Example("y", "Q2?", "ctx", "", {"rules": ["formal"], "answers": ["b"]}),
                Example("z", "Q3?", "ctx", "", {"rules": ["question", "short"], "answers": ["c"]})]
    items = [{**item(ex.id), "response": f"answer {ex.id}"} for ex in examples]
    judge_model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=100_000),
                                  lm_head=SimpleNamespace(weight=torch.zeros(1)))
    evaluation.judge(judge_model, ByteTokenizer(), task, examples, items, evaluation.READER_SAMPLING["paper"], seed=7)
    (call,) = calls
    assert (call["temperature"], call["top_p"], call["max_new_tokens"], call["seed"]) == (0.1, 0.9, 1024, 7)
    short = tasks.PREFERENCE_BY_ID["short"][2]
    assert call["prompts"][0] == (f"<system>{PAPER_JUDGE_SYSTEM}<user>User: Q1?\n\nAssistant: answer x\n\n"
                                  f"User's preference: {short}")  # no template, no requirements, one preference
    assert [it["judge"]["scores"] for it in items] == [[4, 2], [None], [5, 4]]
    for it in items:
        evaluation.judge_metrics(it, "skip")
    assert [it["metrics"]["judge_score"] for it in items] == [3.0, None, 4.5]  # skipped: y has no score at all
    assert [it["metrics"]["judge_unparsed"] for it in items] == [0.0, 1.0, 0.0]
    for it in items:
        evaluation.judge_metrics(it, "one")  # the flag value that counts such a reply as 1
    assert [it["metrics"]["judge_score"] for it in items] == [3.0, 1.0, 4.5]


def test_win_rate_against_one_fixed_reference_answer_per_item_ties_win_and_no_score_loses():
    base = [item("x", judge_score=3.0), item("y", judge_score=None), item("z", judge_score=4.5),
            item("w", judge_score=2.0)]
    run = [item("x", judge_score=3.0), item("y", judge_score=5.0), item("z", judge_score=4.0),
           item("w", judge_score=None)]
    # The base model's answers as the reference: x 3 >= 3 wins (a tie), y loses (the reference has no score: NaN),
    # z 4 < 4.5 loses, w loses (no score). The base's own rate is 1 by construction: "ref", no difference.
    evaluation.set_judge_wins(run, base)
    row = {r["metric"]: r for r in report.compare_rows(base, [run], against_base=True)}["judge_win"]
    assert (row["base"], row["runs"][0]["value"]["mean"], row["runs"][0]["diff"]) == (None, 0.25, None)
    assert (report.format_table([row], ["base", "run"], markdown=False).splitlines()[1].split()[:2]
            == ["judge_win", "ref"])
    # A fixed reference (--judge-reference): both models are measured against the same answers, and differ.
    reference = {"x": 3.5, "y": 4.0, "z": 4.0, "w": 1.0}
    reference = [item(i, judge_score=score) for i, score in reference.items()]
    for items in (base, run):
        evaluation.set_judge_wins(items, reference)
    row = {r["metric"]: r for r in report.compare_rows(base, [run])}["judge_win"]
    assert row["base"]["mean"] == 0.5 and row["runs"][0]["value"]["mean"] == 0.5  # base: z, w; run: y, z
    assert row["runs"][0]["diff"]["mean"] == 0.0 and row["runs"][0]["diff"]["n"] == 4


def test_judge_reference_file_is_checked_before_anything_runs(tmp_path):
    good, bad = tmp_path / "ref.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"id": "x", "answer": "A human answer."}\n{"id": 7, "answer": "Another."}\n')
    assert results.read_reference_answers(good) == {"x": "A human answer.", "7": "Another."}
    bad.write_text('{"id": "x", "answer": "A human answer."}\n{"id": "y"}\n')
    with pytest.raises(MipoError, match=r"bad.jsonl:2: needs fields 'id' .* and 'answer'"):
        results.read_reference_answers(bad)
    with pytest.raises(MipoError, match="file not found"):
        results.read_reference_answers(tmp_path / "none.jsonl")


def test_gsm8k_answer_without_hashes_is_extracted_by_the_same_model_as_the_paper_or_by_rules(monkeypatch):
    prompts_seen = []

    def fake_generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, stop_token_ids=(), seed=0, **options):
        prompts_seen.extend(bytes(p).decode() for p in prompts)
        return [list(b"The number is 18, I think.") + [256] for _ in prompts]

    monkeypatch.setattr(sampler, "generate", fake_generate)
    examples = [Example("a", "Q?", "", "18"), Example("b", "Q?", "", "18"), Example("c", "Q?", "", "18")]
    responses = ["So 9 + 9 = 18.\n#### 18", "She has 3 eggs, then 18 in all.", "Eggs: 7 left, answer 17"]
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=100_000))

    def scored(how):
        items = [{**item(ex.id, **evaluation.score_item(TASKS["gsm8k"], ex, r)), "response": r}
                 for ex, r in zip(examples, responses)]
        evaluation.read_missing_answers(model, ByteTokenizer(), examples, items, how, evaluation.READER_SAMPLING["cpu"],
                                        seed=0, batch_size=4, progress=False)
        return items

    items = scored("model")  # the paper: the model is asked, and the first number of its reply is the answer
    assert prompts_seen == ["<user>Extract the numeric answer from this reasoning, and do not include anythig else in "
                            f"your response other than the number. {r}" for r in responses[1:]]
    assert [it["metrics"]["parsed"] for it in items] == [1.0, 0.0, 0.0]  # '####' read by the paper's reader
    assert [it["metrics"]["correct"] for it in items] == [1.0, 1.0, 1.0]  # the fake model always extracts 18
    assert "fallback" not in items[0] and items[1]["fallback"]["answer"] == "18"
    items = scored("rules")  # this project's rules: the last number of the text
    assert len(prompts_seen) == 2 and [it["metrics"]["correct"] for it in items] == [1.0, 1.0, 0.0]


# ------------------------------------------------------------------ the MI meter

def test_pmi_is_scored_by_the_base_model_and_pmi_self_by_the_model_itself(tmp_path):
    write_tiny_model_dir(tmp_path / "m", seed=0)
    write_tiny_model_dir(tmp_path / "base", seed=1)
    model, tokenizer = load_model(tmp_path / "m")
    base, _ = load_model(tmp_path / "base")
    task = TASKS["jsonl"]
    examples = tasks.load_examples(task, "eval", path=write_user_file(tmp_path / "users.jsonl"))
    items = evaluation.evaluate(model, tokenizer, task, examples, sampler.Sampling(1.0, 1.0, 0, 6), seed=0,
                                batch_size=3, progress=False)
    assert [it["metrics"]["truncated"] for it in items] == [float(not it["stopped"]) for it in items]
    spec = {"name": "m", "eval_dir": tmp_path / "m-eval"}
    results.save_results(spec["eval_dir"], task, items, {})
    args = SimpleNamespace(no_mi=False, mi_reference={"name": "base", "model": str(tmp_path / "base")}, device="cpu",
                           torch_dtype=torch.float32, batch_size=3, compile=False)
    evaluation.meter_all([(spec, items)], task, examples, args)
    negatives = [x_prime for x_prime, _, _ in mipo.plan_negatives(task, examples, task.negative, mipo.METER_SEED)]
    assert all(n.id != ex.id for n, ex in zip(negatives, examples))  # jsonl's x': another held-out prompt

    def full_forward_logp(scorer, messages, it):
        prompt, response = mipo.encode_turn(tokenizer, messages, it["response"], it["stopped"])
        with torch.no_grad():
            logits = scorer(torch.tensor([prompt + response]))[0, len(prompt) - 1:-1]
        return (torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None]).sum().item(),
                len(response))

    for ex, negative, it in zip(examples, negatives, items):
        for key, scorer in (("pmi", base), ("pmi_self", model)):
            (under_x, length), (under_x_prime, _) = (
                full_forward_logp(scorer, tasks.prompt_messages(task, ex), it),
                full_forward_logp(scorer, tasks.prompt_messages(task, negative), it))
            assert it["metrics"][key] == pytest.approx(under_x - under_x_prime, abs=1e-4), key
        assert it["metrics"]["length"] == length
    assert any(abs(it["metrics"]["pmi"] - it["metrics"]["pmi_self"]) > 1e-2 for it in items)  # two models, two meters
    saved = [json.loads(line) for line in (spec["eval_dir"] / "jsonl.jsonl").read_text().splitlines()]
    assert [s["metrics"]["pmi"] for s in saved] == [it["metrics"]["pmi"] for it in items]
    assert all(s["mi_reference"]["model"] == "base" for s in saved)
    # Beside the results, the base model's terms token by token: one line per answer, summing to its pmi.
    lines = [json.loads(line) for line in (spec["eval_dir"] / "jsonl.tokens.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [it["id"] for it in items]
    for line, it, ex in zip(lines, items, examples):
        ids = mipo.encode_turn(tokenizer, tasks.prompt_messages(task, ex), it["response"], it["stopped"])[1]
        assert line["pmi"] == it["metrics"]["pmi"] and line["length"] == len(ids) == len(line["pmi_tokens"])
        assert "".join(line["tokens"]) == tokenizer.decode(ids, False) and line["stopped"] == it["stopped"]
        assert math.fsum(line["pmi_tokens"]) == pytest.approx(line["pmi"], abs=1e-4)  # float32 sums of tens of nats


# ------------------------------------------------------------------ --compare end to end

def test_compare_two_synthetic_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # runs/eval/... of the base lands here
    data = write_user_file(tmp_path / "users.jsonl")
    base = write_tiny_model_dir(tmp_path / "base")
    run_a, run_b = write_run(tmp_path / "run_a", data, seed=1), write_run(tmp_path / "run_b", data, seed=2)
    argv = ["--compare", str(base), str(run_a), str(run_b), "--n", "4", "--max-new-tokens", "6", "--judge", str(base),
            "--batch-size", "4"]
    evaluation.main(argv)  # the task and its data come from the runs' config.json
    out = capsys.readouterr().out
    table = out.splitlines()[1:]
    assert table[0].split() == ["metric", "base", "run_a", "diff", "[95%", "CI]", "run_b", "diff", "[95%", "CI]"]
    assert [line.split()[0] for line in table[1:11]] == ["judge_score", "judge_win", "judge_unparsed", "correct",
                                                         "parsed", "pmi", "pmi_per_token", "pmi_self", "length",
                                                         "truncated"]
    assert table[11].startswith("judge replies without an integer (skipped, as the paper does): base ")

    for run in (run_a, run_b):
        items = [json.loads(line) for line in (run / "eval" / "jsonl.jsonl").read_text().splitlines()]
        assert [it["id"] for it in items] == ["u4", "u9", "u14", "u19"]  # the held-out fifth of the run's data
        assert all(len(it["judge"]["scores"]) == 2 for it in items)  # two stated preferences per user
        summary = json.loads((run / "eval" / "jsonl.summary.json").read_text())
        assert summary["settings"]["n"] == 4 and summary["judge"]["scored"] == 8
        markdown = (run / "eval" / "compare-jsonl.md").read_text()
        assert markdown.startswith("# jsonl: ") and "| metric | " in markdown and "`judge_win`" in markdown
        assert "'top_k': 50" in markdown and "'repetition_penalty': 1.0" in markdown  # the settings in force
        assert f", seed 0, judge {base};" in markdown
        for png in ("compare-jsonl.png", "curves.png"):
            assert (run / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert (run / "eval" / png).stat().st_size > 10_000
    assert not list(tmp_path.rglob("*.tmp*"))  # nothing half-written

    # Cached: nothing is loaded, sampled or judged again, and the table is the same.
    monkeypatch.setattr("bookkeeping.results.load_model", lambda *a, **k: pytest.fail("loaded a model despite the cache"))
    evaluation.main(argv)
    assert capsys.readouterr().out == out


def test_judge_reference_answers_are_judged_once_and_every_model_is_measured_against_them(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    data = write_user_file(tmp_path / "users.jsonl")
    base, run = write_tiny_model_dir(tmp_path / "base"), write_run(tmp_path / "run_a", data, seed=1)
    reference = tmp_path / "ref.jsonl"
    reference.write_text("".join(json.dumps({"id": f"u{i}", "answer": f"w{i} answer"}) + "\n" for i in (4, 9, 14, 19)))
    argv = ["--compare", str(base), str(run), "--n", "4", "--max-new-tokens", "6", "--judge", str(base),
            "--batch-size", "4", "--judge-reference", str(reference)]
    evaluation.main(argv)
    out = capsys.readouterr().out
    win = next(line for line in out.splitlines() if line.startswith("judge_win")).split()
    assert win[1] != "ref" and "judge_win is against --judge-reference's answers" in out  # the base has a rate too
    (cached,) = (tmp_path / "runs" / "eval" / "judge-reference").iterdir()
    judged = [json.loads(line) for line in (cached / "jsonl.jsonl").read_text().splitlines()]
    assert [it["response"] for it in judged] == [f"w{i} answer" for i in (4, 9, 14, 19)]
    assert all(len(it["judge"]["scores"]) == 2 for it in judged)
    base_file = next((tmp_path / "runs" / "eval").glob("*/jsonl.jsonl"))  # the base's results (the run's are in it)
    base_items = [json.loads(line) for line in base_file.read_text().splitlines()]
    evaluation.set_judge_wins(base_items, judged)
    assert float(win[1]) == pytest.approx(sum(it["metrics"]["judge_win"] for it in base_items) / 4, abs=5e-4)
    # A rerun judges nothing again, the reference included.
    monkeypatch.setattr("bookkeeping.results.load_model", lambda *a, **k: pytest.fail("loaded a model despite the cache"))
    evaluation.main(argv)
    assert capsys.readouterr().out == out
    reference.write_text('{"id": "u4", "answer": "only one"}\n')
    with pytest.raises(MipoError, match="ref.jsonl: no reference answer for held-out item 'u9' \\(and 2 more\\)"):
        evaluation.main(argv)


def test_compare_reads_a_real_train_py_run(tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.chdir(tmp_path)
    data, base = write_user_file(tmp_path / "users.jsonl"), write_tiny_model_dir(tmp_path / "base", soft=True)
    run = tmp_path / "runs" / "tiny-jsonl-random-sigmoid"
    train.main(["--model", str(base), "--task", "jsonl", "--data", str(data), "--negative", "random", "--n", "4",
                "--n-eval", "2", "--max-new-tokens", "6", "--temperature", "1.0", "--lr", "1e-3", "--warmup-ratio", "0",
                "--batch-size", "4", "--epochs", "2", "--device", "cpu", "--dtype", "float32", "--out", str(run)])
    capsys.readouterr()
    # Training moved the model: the second step (the same 4 pairs, one update later) has a positive margin, and the
    # saved weights are not the base's.
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[1]["rewards/margins"] > 0
    trained, _ = load_model(run / "final")
    untrained, _ = load_model(base)
    assert max((a - b).abs().max().item() for a, b in zip(trained.parameters(), untrained.parameters())) > 1e-4

    evaluation.main(["--compare", str(base), str(run), "--n", "4", "--max-new-tokens", "6", "--judge", "none"])
    table = capsys.readouterr().out.splitlines()[1:]
    assert table[0].split()[:3] == ["metric", "base", "tiny-jsonl-random-sigmoid"]  # task and data: from the run
    assert [line.split()[0] for line in table[1:]] == ["correct", "parsed", "pmi", "pmi_per_token", "pmi_self",
                                                     "length", "truncated"]
    for name in ("jsonl.jsonl", "jsonl.summary.json", "compare-jsonl.md", "compare-jsonl.png", "curves.png"):
        assert (run / "eval" / name).stat().st_size > 0, name
    assert ", seed 0; CPU" in (run / "eval" / "compare-jsonl.md").read_text()  # no judge named where none was asked
    # The table's numbers are the per-item files' means: recomputed here from them, independently of eval.py.
    per_item = {who: [json.loads(line) for line in (where / "jsonl.jsonl").read_text().splitlines()]
                for who, where in (("base", results.resolve(str(base))["eval_dir"]), ("run", run / "eval"))}
    assert [it["id"] for it in per_item["base"]] == [it["id"] for it in per_item["run"]] == ["u4", "u9", "u14", "u19"]
    for line in table[1:]:
        metric, base_mean, run_mean, diff = line.split()[:4]
        means = {who: np.mean([it["metrics"][metric] for it in items]) for who, items in per_item.items()}
        assert (float(base_mean), float(run_mean), float(diff)) == pytest.approx(
            (means["base"], means["run"], means["run"] - means["base"]), abs=1.5e-3), metric


def test_single_model_evaluation_and_tables_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_user_file(tmp_path / "users.jsonl")
    run = write_run(tmp_path / "run", data, seed=1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setattr(report, "_warned_no_matplotlib", [])
    evaluation.main(["--model", str(run), "--n", "3", "--max-new-tokens", "4", "--judge", "none", "--no-mi"])
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"{run} on jsonl: 3 items -> {run / 'eval'}"
    assert "correct" in captured.out and "pmi" not in captured.out and "judge_score" not in captured.out
    assert "plots skipped: matplotlib is not installed" in captured.err
    assert (run / "eval" / "jsonl.jsonl").is_file() and not (run / "eval" / "curves.png").exists()
    monkeypatch.setattr(report, "_warned_no_matplotlib", [])
    evaluation.main(["--compare", str(run / "final"), str(run), "--n", "3", "--max-new-tokens", "4", "--judge", "none",
                     "--no-mi", "--out", str(tmp_path / "report")])
    assert ((tmp_path / "report" / "compare-jsonl.md").is_file()
            and not (tmp_path / "report" / "compare-jsonl.png").exists())
    assert capsys.readouterr().err.count("plots skipped") == 1  # one line for the chart and the curves together


# ------------------------------------------------------------------ bad input: one line, exit status 2

@pytest.mark.parametrize("argv, message", [
    (["--compare", "base", "missing_run"], "error: missing_run: no such run directory or model"),
    (["--model", "broken", "--task", "gsm8k", "--n", "2"], "error: broken: no model.safetensors"),
    (["--model", "base", "--task", "nope"], "error: --task nope: unknown task (known: persona"),
    (["--model", "empty_run", "--task", "gsm8k"], "error: empty_run: run directory without a trained model"),
    (["--model", "base"], "error: --task is required"),
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, argv, message):
    write_tiny_model_dir(tmp_path / "base")
    shutil.copytree(tmp_path / "base", tmp_path / "broken")  # a model directory without its weights
    (tmp_path / "broken" / "model.safetensors").unlink()
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / files.RUN_METRICS).write_text("")
    result = subprocess.run([sys.executable, str(ROOT / "eval.py"), *argv], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "runs").exists()  # nothing written
