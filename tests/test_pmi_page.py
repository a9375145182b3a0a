"""bookkeeping/pmi_page.py: the page of a tiny train.py run and of eval.py --compare, read back with the standard
library's html.parser: every held-out item is on it with the numbers of the tokens files, largest change first, and
the training pairs with their stored reference log-probs; any text is shown as text (a <script> in a prompt or an
answer runs nothing); the page fetches nothing."""
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

import mipo
import tasks
import train
from bookkeeping import pmi_page
from formats.files import read_jsonl
from test_train import args_for, make_assets


class Node:
    def __init__(self, tag: str, attrs: dict):
        self.tag, self.attrs, self.children = tag, attrs, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find(self, tag: str | None = None, cls: str | None = None) -> list:
        """Every node below this one with the tag and class, in document order."""
        out = []
        for child in self.children:
            if isinstance(child, Node):
                if (tag is None or child.tag == tag) and (cls is None or cls in child.attrs.get("class", "").split()):
                    out.append(child)
                out += child.find(tag, cls)
        return out


class Page(HTMLParser):
    """A page as a tree, and every start tag and attribute seen."""
    VOID = {"meta", "br", "img", "input", "link", "hr", "source", "embed"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root, self.tags = Node("document", {}), []
        self.stack = [self.root]
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.tags.append((tag, dict(attrs)))
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        for k in range(len(self.stack) - 1, 0, -1):
            if self.stack[k].tag == tag:
                del self.stack[k:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def assert_self_contained(page: Page, text: str):
    """No script, no external resource of any kind: the page opens from disk as it is."""
    assert not any(tag in ("script", "link", "img", "iframe", "object", "embed") for tag, _ in page.tags)
    assert not any(key.startswith("on") or key == "src" for _, attrs in page.tags for key in attrs)
    assert all(attrs["href"].startswith("#") for tag, attrs in page.tags if "href" in attrs)
    assert "url(" not in text and "@import" not in text and "@font-face" not in text


def shown_answer(answer: Node) -> dict:
    """An answer as the page shows it: its pmi, its tokens (the spans' texts) and their terms (the hover values)."""
    numbers = answer.find("span", "numbers")[0].text()
    spans = answer.find("div", "text")[0].find("span")
    return {"pmi": numbers.split("pmi ")[1].split(" nats")[0], "tokens": [s.text() for s in spans],
            "terms": [float(s.attrs["title"].split()[0]) for s in spans],
            "length": int(numbers.split(", ")[2].split(" tokens")[0])}


def assert_items_as_in_the_files(page: Page, tokens: list[dict[str, dict]], prompts: dict):
    """Every held-out item once, with each answer's tokens, terms and pmi as its tokens file holds them and its
    prompt x and x'; largest |change| first."""
    items = page.root.find("div", "item")
    assert sorted(item.attrs["id"] for item in items) == sorted(f"item-{i}" for i in prompts)
    changes = []
    for item in items:
        item_id = item.attrs["id"].removeprefix("item-")
        x, x_prime = (d.text() for d in item.find("details", "msg"))
        assert prompts[item_id][0] in x and prompts[item_id][1] in x_prime
        shown = [shown_answer(a) for a in item.find("div", "answer")]
        for answer, rows in zip(shown, tokens):
            row = rows[item_id]
            assert answer["tokens"] == row["tokens"] and answer["length"] == row["length"]
            assert answer["terms"] == pytest.approx(row["pmi_tokens"], abs=5e-4)
            assert answer["pmi"] == f"{row['pmi']:.3f}"
        changes.append(tokens[1][item_id]["pmi"] - tokens[0][item_id]["pmi"])
    assert [abs(c) for c in changes] == sorted((abs(c) for c in changes), reverse=True)


def meter_prompts(data: Path, n: int) -> dict[str, tuple[str, str]]:
    """{id: (x, x')} of a jsonl task's held-out items: x' another held-out prompt, drawn as the meter draws it."""
    task = tasks.get_task("jsonl")
    examples = tasks.load_examples(task, "eval", n, data)
    plan = mipo.plan_negatives(task, examples, task.negative, mipo.METER_SEED)
    return {ex.id: (ex.question, x_prime.question) for ex, (x_prime, _, _) in zip(examples, plan)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("page"))


def test_train_py_writes_a_page_with_every_held_out_item_and_pair(assets, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(args_for(assets, out, "--n-eval", "4"))
    assert f"page: {out / 'pmi.html'}" in capsys.readouterr().out
    text = (out / "pmi.html").read_text()
    page = Page(text)
    assert_self_contained(page, text)
    tokens = [pmi_page.read_token_rows(out / f"{side}.tokens.jsonl") for side in ("base_eval", "trained_eval")]
    held_out = read_jsonl(out / "eval_pairs.jsonl")
    assert len(held_out) == 3 and set(tokens[0]) == set(tokens[1]) == {p["id"] for p in held_out}
    prompts = meter_prompts(assets["data"], 4)
    assert set(prompts) == {p["id"] for p in held_out}
    assert_items_as_in_the_files(page, tokens, prompts)
    # The summary table: the meter's means before and after, as summary.json holds them.
    summary = json.loads((out / "summary.json").read_text())
    cells = [[c.text() for c in row.find()] for row in page.root.find("table")[0].find("tr")]
    assert cells[1] == ["pmi (nats)", f"{summary['base_eval']['pmi']:.3f}", f"{summary['trained_eval']['pmi']:.3f}",
                        f"{summary['trained_eval']['pmi'] - summary['base_eval']['pmi']:+.3f}"]
    # The pairs: each with its responses and its stored reference log-probs, and a word on the rewards.
    pairs, reference = read_jsonl(out / "pairs.jsonl"), {r["id"]: r for r in read_jsonl(out / "reference.jsonl")}
    shown = page.root.find("details", "pair")
    assert [d.attrs["id"] for d in shown] == [f"pair-{p['id']}" for p in pairs]
    for block, pair in zip(shown, pairs):
        summary_line = block.find("summary")[0].text()
        assert f"{reference[pair['id']]['ref_chosen_logps']:.3f}" in summary_line
        assert f"{reference[pair['id']]['ref_rejected_logps']:.3f}" in summary_line
        assert [d.text() for d in block.find("div", "text")][-2:] == [pair["chosen"][0]["content"],
                                                                      pair["rejected"][0]["content"]]
    assert "shown here are the stored reference log-probs" in page.root.text()


def test_any_text_is_shown_as_text(tmp_path):
    hostile = ['<script>alert("x")</script>', "</td></tr></table><b>bold", "\"><img src=x onerror=alert(1)>",
               "a & b &amp; c", "<!-- not a comment -->", "</div></div></body>"]
    chat = [{"role": "user", "content": " ".join(hostile)}]
    items = [{"id": f'q{k}"><script>', "x": chat, "x_prime": [{"role": "<system>", "content": hostile[k]}],
              "answers": [pmi_page.answer(None, {"tokens": hostile + ["", "é"], "pmi_tokens": [0.5] * 8, "pmi": 4.0,
                                                 "length": 8, "stopped": False}),
                          pmi_page.answer(hostile[k], None, {"pmi": -1.0 * k, "length": 3.0}, True)]}
             for k in range(len(hostile))]
    pair = {"id": "<p1>", "prompt": chat, "negative_prompt": chat, "chosen": [{"content": hostile[0]}],
            "rejected": [{"content": hostile[1]}]}
    text = pmi_page.render_page("</title><script>", ["<base>", "run</th>"], items, "a <note>",
                                {"pairs": [(pair, None)], "total": 1, "beta": 0.1})
    page = Page(text)
    assert_self_contained(page, text)
    assert [tag for tag, _ in page.tags if tag == "img" or tag == "script"] == []
    bold = [node for node in page.root.find("b") if "bold" in node.text()]
    assert bold == []  # "<b>bold" stayed text
    shown = page.root.text()
    for piece in hostile + ["</title><script>", "<base>", "run</th>", "a <note>", "<p1>", '<system>']:
        assert piece in shown, piece
    items_shown = page.root.find("div", "item")
    assert len(items_shown) == len(hostile)
    first = [shown_answer(a) for a in items_shown[0].find("div", "answer")][0]
    assert first["tokens"] == hostile + ["é"]  # the empty piece's term goes on to the next: their sum on hover
    assert first["terms"] == [0.5] * 6 + [1.0]
    assert page.root.find("title")[0].text() == "</title><script>"


def test_eval_compare_writes_a_page_per_run_with_the_base_models_terms(tmp_path, monkeypatch, capsys):
    import eval as evaluation
    from test_eval import write_tiny_model_dir, write_user_file

    monkeypatch.chdir(tmp_path)
    data, base = write_user_file(tmp_path / "users.jsonl"), write_tiny_model_dir(tmp_path / "base", soft=True)
    run = tmp_path / "runs" / "tiny"
    train.main(["--model", str(base), "--task", "jsonl", "--data", str(data), "--negative", "random", "--n", "4",
                "--n-eval", "2", "--max-new-tokens", "6", "--lr", "1e-3", "--warmup-ratio", "0", "--batch-size", "4",
                "--device", "cpu", "--dtype", "float32", "--out", str(run)])
    evaluation.main(["--compare", str(base), str(run), "--n", "4", "--max-new-tokens", "6", "--judge", "none"])
    assert f"page: {run / 'eval' / 'pmi-jsonl.html'}" in capsys.readouterr().err
    text = (run / "eval" / "pmi-jsonl.html").read_text()
    page = Page(text)
    assert_self_contained(page, text)
    base_eval = next(Path("runs/eval").glob("*/jsonl.tokens.jsonl"))
    tokens = [pmi_page.read_token_rows(path) for path in (base_eval, run / "eval" / "jsonl.tokens.jsonl")]
    prompts = meter_prompts(data, 4)
    assert set(prompts) == {"u4", "u9", "u14", "u19"}
    assert_items_as_in_the_files(page, tokens, prompts)
    assert page.root.find("details", "pair") == []  # eval.py's page: the held-out items alone

    # Evaluated anew without the meter: the old terms are gone with the old answers, and the page shows the new
    # answers as plain text.
    evaluation.main(["--compare", str(base), str(run), "--n", "4", "--max-new-tokens", "4", "--judge", "none",
                     "--no-mi"])
    assert not (run / "eval" / "jsonl.tokens.jsonl").exists() and not base_eval.exists()
    page = Page((run / "eval" / "pmi-jsonl.html").read_text())
    responses = {it["id"]: it["response"] for it in read_jsonl(run / "eval" / "jsonl.jsonl")}
    for item in page.root.find("div", "item"):
        answers = item.find("div", "answer")
        assert all(a.find("span", "numbers")[0].text().startswith("pmi - nats") for a in answers)
        assert answers[1].find("div", "text")[0].text() == responses[item.attrs["id"].removeprefix("item-")]
        assert not any(a.find("div", "text")[0].find("span") for a in answers)
