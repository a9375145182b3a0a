"""The pointwise MI token by token, which a reader of the method can skip: the meter's terms
log pi_ref(y_t | x, y_<t) - log pi_ref(y_t | x', y_<t) (mipo.pointwise_mi), written next to the meter's rows, one
JSON line per answer, and a page per run that shades every token of the held-out answers by its term.

    RUN/base_eval.tokens.jsonl, RUN/trained_eval.tokens.jsonl    train.py's held-out meter, before and after
    RUN/eval/TASK.tokens.jsonl                                    eval.py's pmi, under the base model
    RUN/pmi.html                                                  train.py's page: the held-out meter and the pairs
    RUN/eval/pmi-TASK.html                                        eval.py --compare's page: the base and the run

A page is one self-contained HTML file (no script, no font, nothing fetched: it opens from disk), and every piece of
text on it, prompts, answers, ids and names, goes through html.escape.
"""
import html
import json
import math
from pathlib import Path

import mipo
from formats.files import RUN_CONFIG, RUN_SUMMARY, read_json, read_jsonl, write_atomically
from tasks import get_task, load_examples, prompt_messages

TOKENS_SUFFIX = ".tokens.jsonl"
RUN_PAGE = "pmi.html"
PAIRS_SHOWN = 500  # the first pairs of a run on its page; all are in pairs.jsonl
PREVIEW = 160  # characters of a prompt shown while it is folded
SHADES = 5  # shades on each side of 0: a term's shade is round(5 * term / scale), clamped to [-5, 5]


# ---------------------------------------------------------------------------------------------------
# The terms per token: one JSON line per answer.
# ---------------------------------------------------------------------------------------------------


def token_rows(tokenizer, ids: list[str], values: list[float], stopped: list[bool], terms: list) -> list[dict]:
    """One row per answer: its id, pmi (the sum), length, whether it stopped by itself, its tokens as text pieces
    and the term of each (None where the meter has none: mipo.pointwise_mi)."""
    return [{"id": item_id, "pmi": value, "length": len(token_ids), "stopped": bool(ended),
             "tokens": tokenizer.pieces(token_ids), "pmi_tokens": pmi_tokens}
            for item_id, value, ended, (token_ids, pmi_tokens) in zip(ids, values, stopped, terms)]


def meter_token_rows(tokenizer, meter: dict) -> list[dict]:
    """The rows of a mipo.held_out_meter result; its per_token list is taken out of it (summary.json keeps sums)."""
    terms = meter.pop("per_token")
    items = meter["items"]
    return token_rows(tokenizer, [item["id"] for item in items], [item["metrics"]["pmi"] for item in items],
                      [not item["metrics"]["truncated"] for item in items],
                      [(t["ids"], t["pmi_tokens"]) for t in terms])


def tokens_file(eval_dir: Path, task_name: str) -> Path:
    """eval.py's tokens file of one model, beside its results EVAL_DIR/TASK.jsonl."""
    return Path(eval_dir) / f"{task_name}{TOKENS_SUFFIX}"


def write_token_rows(path: Path, rows: list[dict]) -> None:
    write_atomically(Path(path), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_token_rows(path: Path) -> dict[str, dict]:
    """{item id: row} of a tokens file; {} where there is none (a run from before the file existed)."""
    path = Path(path)
    return {row["id"]: row for row in read_jsonl(path)} if path.is_file() else {}


# ---------------------------------------------------------------------------------------------------
# What a page shows of an item: x, x', and two answers (the base model's and the trained model's), each with its
# text, its tokens and terms where the meter wrote them, and its numbers.
# ---------------------------------------------------------------------------------------------------


def answer(text: str | None, row: dict | None, metrics: dict | None = None, stopped: bool | None = None) -> dict:
    """One answer: its tokens and terms from its tokens row where there is one, else its text unshaded; pmi, length
    and whether it stopped from the row, else from the results' metrics."""
    metrics = metrics or {}
    if row is not None:
        return {"text": "".join(row["tokens"]), "tokens": row["tokens"], "terms": row["pmi_tokens"],
                "pmi": row["pmi"], "length": row["length"], "stopped": row["stopped"]}
    length = metrics.get("length")
    return {"text": text, "tokens": None, "terms": None, "pmi": metrics.get("pmi"),
            "length": None if length is None else int(length), "stopped": stopped}


def per_token(a: dict) -> float | None:
    return a["pmi"] / a["length"] if a["pmi"] is not None and a["length"] else None


def change(item: dict) -> float | None:
    """The trained answer's pmi minus the base answer's: the order of the page."""
    base, run = item["answers"]
    return None if base["pmi"] is None or run["pmi"] is None else run["pmi"] - base["pmi"]


def meter_prompts(task, examples: list) -> list[tuple[str, list, list]]:
    """(id, x, x') of each held-out item, x' the meter's own (mipo.meter_rows: the task's negative, a fixed seed);
    x' = [] where there is none (a random x' needs a second item)."""
    if task.negative.startswith("random") and len(examples) < 2:
        return [(ex.id, prompt_messages(task, ex), []) for ex in examples]
    rows = mipo.meter_rows(task, examples, [("", True)] * len(examples))
    return [(ex.id, x, x_prime) for ex, (x, x_prime, _, _) in zip(examples, rows)]


# ---------------------------------------------------------------------------------------------------
# The pages of train.py and eval.py --compare.
# ---------------------------------------------------------------------------------------------------


def write_run_page(run_dir: Path) -> Path:
    """RUN/pmi.html from the run's files: every held-out prompt with the base model's answer (its sample in
    eval_pairs.jsonl) and the trained model's (trained_eval.tokens.jsonl), each shaded by the base model's terms,
    and the training pairs with their stored reference log-probs."""
    run_dir = Path(run_dir)
    cfg = read_json(run_dir / RUN_CONFIG)["pairs"]
    summary = read_json(run_dir / RUN_SUMMARY)
    items, note = [], "no held-out prompts (--n-eval 0): no meter."
    if summary.get("base_eval") and summary.get("trained_eval"):
        base_rows = read_token_rows(run_dir / f"base_eval{TOKENS_SUFFIX}")
        run_rows = read_token_rows(run_dir / f"trained_eval{TOKENS_SUFFIX}")
        base_metrics = {it["id"]: it["metrics"] for it in summary["base_eval"]["items"]}
        run_metrics = {it["id"]: it["metrics"] for it in summary["trained_eval"]["items"]}
        base_pairs = {p["id"]: p for p in read_jsonl(run_dir / "eval_pairs.jsonl")}
        task = get_task(cfg["task"])
        examples = load_examples(task, "eval", cfg["n_eval"], cfg["data"], cfg["eval_data"])
        for item_id, x, x_prime in meter_prompts(task, examples):
            sample, metrics = base_pairs[item_id], run_metrics.get(item_id, {})
            items.append({"id": item_id, "x": x, "x_prime": x_prime, "answers": [
                answer(sample["chosen"][0]["content"], base_rows.get(item_id), base_metrics.get(item_id),
                       sample.get("chosen_stopped", True)),
                answer(None, run_rows.get(item_id), metrics, not metrics.get("truncated", 0))]})
        note = ("Each model's own sample from x, both scored by the base model (summary.json: base_eval and "
                "trained_eval).")
    pairs_path = run_dir / "pairs.jsonl" if (run_dir / "pairs.jsonl").is_file() else Path(cfg.get("pairs_file") or "")
    pairs = run_pairs(pairs_path, run_dir / "reference.jsonl", read_json(run_dir / RUN_CONFIG)["loss"]["beta"])
    out = run_dir / RUN_PAGE
    write_atomically(out, render_page(f"{run_dir.name}: pointwise MI, token by token", ["base model", "trained"],
                                      items, note, pairs))
    return out


def write_compare_page(out: Path, names: list[str], prompts: list[tuple[str, list, list]],
                       models: list[tuple[list[dict], dict]]) -> Path:
    """eval.py --compare's page of the base and one run: prompts (id, x, x') and per model (its result items, its
    tokens rows by id), each answer shaded by the base model's terms where eval.py metered it."""
    (base_items, base_rows), (run_items, run_rows) = models
    by_id = [{it["id"]: it for it in items} for items in (base_items, run_items)]
    items = []
    for item_id, x, x_prime in prompts:
        answers = []
        for results, rows in zip(by_id, (base_rows, run_rows)):
            it = results[item_id]
            answers.append(answer(it["response"], rows.get(item_id), it["metrics"], it.get("stopped")))
        items.append({"id": item_id, "x": x, "x_prime": x_prime, "answers": answers})
    note = ("Each model's own sample from x (eval.py's results), both scored by the base model "
            f"({names[0]}): the table's pmi.")
    write_atomically(out, render_page(f"{names[1]} against {names[0]}: pointwise MI, token by token", names,
                                      items, note))
    return out


def run_pairs(pairs_path: Path, reference_path: Path, beta: float) -> dict | None:
    """The run's pairs with their stored reference log-probs, for the page; None where either file is missing."""
    if not (pairs_path.is_file() and reference_path.is_file()):
        return None
    pairs = read_jsonl(pairs_path)
    reference = {r["id"]: r for r in read_jsonl(reference_path)}
    return {"pairs": [(p, reference.get(p["id"])) for p in pairs[:PAIRS_SHOWN]], "total": len(pairs), "beta": beta}


# ---------------------------------------------------------------------------------------------------
# The HTML: escaped text, a shade per token, the legend, the summary table, the items, the pairs.
# ---------------------------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 80em; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
table.summary { border-collapse: collapse; } .summary td, .summary th { border: 1px solid #ccc; padding: 2px 8px; }
.summary td { text-align: right; font-variant-numeric: tabular-nums; }
.item, .pair { border-top: 1px solid #bbb; padding: 0.6em 0; }
.head { font-weight: 600; } .up { color: #1a5a9a; } .down { color: #a3212f; }
.answers { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.answer .text, .msg .text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace;
  font-size: 13px; background: #fafafa; border: 1px solid #e4e4e4; padding: 4px 6px; margin: 2px 0; }
.numbers { font-size: 12px; color: #555; } .role { font-size: 12px; color: #777; }
.legend span { display: inline-block; min-width: 3.2em; text-align: center; font-size: 12px; padding: 1px 0; }
summary { cursor: pointer; } .note { color: #555; }
"""


def shade_css() -> str:
    """n5 .. n1, z, p1 .. p5: red where x' made the token likelier than x, blue where x did, white at 0."""
    rules = []
    for k in range(1, SHADES + 1):
        alpha = 0.85 * k / SHADES
        rules.append(f".p{k} {{ background: rgba(33, 102, 172, {alpha:.2f}); }}")
        rules.append(f".n{k} {{ background: rgba(178, 24, 43, {alpha:.2f}); }}")
    return "\n".join(rules) + "\n"


def shade(term: float, scale: float) -> str:
    k = max(-SHADES, min(SHADES, round(SHADES * term / scale)))
    return "z" if k == 0 else f"p{k}" if k > 0 else f"n{-k}"


def nice_scale(terms: list[float]) -> float:
    """The legend's end: the 95th percentile of |term| on the page, rounded up to 1, 2 or 5 times a power of 10."""
    magnitudes = sorted(abs(t) for t in terms)
    if not magnitudes or magnitudes[-1] == 0:
        return 1.0
    top = magnitudes[min(len(magnitudes) - 1, int(0.95 * len(magnitudes)))] or magnitudes[-1]
    power = 10 ** math.floor(math.log10(top))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= top)


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def number(value, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def shaded(a: dict, scale: float) -> str:
    """An answer's tokens, each in a span shaded by its term, the term on hover; a token that adds no text (a byte
    of a character still to come) passes its term on to the next, which shows their sum."""
    if a["tokens"] is None or a["terms"] is None:
        return esc(a["text"] if a["text"] is not None else "(not recorded)")
    out, carried, count = [], 0.0, 0
    for piece, term in zip(a["tokens"], a["terms"]):
        carried, count = carried + term, count + 1
        if piece == "":
            continue
        tokens = f" ({count} tokens)" if count > 1 else ""
        out.append(f'<span class={shade(carried, scale)} title="{carried:+.3f}{tokens}">{esc(piece)}</span>')
        carried, count = 0.0, 0
    return "".join(out)


def messages(label: str, chat: list[dict]) -> str:
    """A prompt's chat messages, folded under its label and the start of its last message."""
    body = "".join(f'<div class=role>{esc(m.get("role", ""))}</div><div class=text>{esc(m.get("content", ""))}</div>'
                   for m in chat)
    last = " ".join(str(chat[-1].get("content", "")).split()) if chat else "(none)"
    start = last if len(last) <= PREVIEW else last[:PREVIEW] + "…"
    return f"<details class=msg><summary>{esc(label)}: <span class=role>{esc(start)}</span></summary>{body}</details>"


def answer_html(name: str, a: dict, scale: float) -> str:
    stop = "" if a["stopped"] is None else ", stopped" if a["stopped"] else ", cut at the token limit"
    numbers = (f"pmi <b>{number(a['pmi'])}</b> nats, per token {number(per_token(a))}, "
               f"{number(a['length'], '{}')} tokens{stop}")
    return (f"<div class=answer><div><b>{esc(name)}</b> <span class=numbers>{numbers}</span></div>"
            f"<div class=text>{shaded(a, scale)}</div></div>")


def legend(scale: float) -> str:
    cells = []
    for k in range(-SHADES, SHADES + 1):
        value = scale * k / SHADES
        label = f"{value:+.2g}" if k else "0"
        if abs(k) == SHADES:
            label = ("&le; " if k < 0 else "&ge; ") + label
        cells.append(f"<span class={shade(value, scale)}>{label}</span>")
    return ("<p class=legend>term of a token, log &pi;<sub>ref</sub>(y<sub>t</sub> | x, y<sub>&lt;t</sub>) &minus; "
            "log &pi;<sub>ref</sub>(y<sub>t</sub> | x&prime;, y<sub>&lt;t</sub>), nats (hover a token for its "
            f"value): {''.join(cells)}<br>blue: x makes the token likelier than x&prime; red: x&prime; does. "
            "An answer's terms sum to its pmi.</p>")


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summary_table(names: list[str], items: list[dict]) -> str:
    rows = [("pmi (nats)", lambda a: a["pmi"]), ("pmi per token", per_token),
            ("length (tokens)", lambda a: a["length"]),
            ("cut at the token limit", lambda a: None if a["stopped"] is None else float(not a["stopped"]))]
    head = "".join(f"<th>{esc(name)}</th>" for name in names)
    lines = [f"<tr><th></th>{head}<th>difference</th></tr>"]
    for label, value in rows:
        means = [mean([value(item["answers"][k]) for item in items]) for k in (0, 1)]
        diff = None if None in means else means[1] - means[0]
        lines.append(f"<tr><th>{label}</th><td>{number(means[0])}</td><td>{number(means[1])}</td>"
                     f"<td>{number(diff, '{:+.3f}')}</td></tr>")
    changes = [change(item) for item in items]
    rose, fell = sum(c is not None and c > 0 for c in changes), sum(c is not None and c < 0 for c in changes)
    return (f"<table class=summary>{''.join(lines)}</table><p>{len(items)} held-out prompts; the pmi rose on {rose} "
            f"and fell on {fell}. Means over the prompts; the difference is {esc(names[1])} &minus; "
            f"{esc(names[0])}.</p>")


def item_html(rank: int, item: dict, names: list[str], scale: float) -> str:
    c = change(item)
    direction = "" if c is None else " class=up" if c > 0 else " class=down" if c < 0 else ""
    head = (f"<div class=head>{rank}. {esc(item['id'])}: pmi change <span{direction}>{number(c, '{:+.3f}')}</span>"
            " nats</div>")
    answers = "".join(answer_html(name, a, scale) for name, a in zip(names, item["answers"]))
    return (f"<div class=item id=\"item-{esc(item['id'])}\">{head}{messages('x, the prompt', item['x'])}"
            f"{messages('x′, the meter’s other prompt', item['x_prime'])}<div class=answers>{answers}</div></div>")


def extremes(ordered: list[dict]) -> str:
    """Links to the ten largest gains and the ten largest losses."""
    parts = []
    for label, chosen in (("largest gains", [i for i in ordered if (change(i) or 0) > 0][:10]),
                          ("largest losses", [i for i in ordered if (change(i) or 0) < 0][:10])):
        links = ", ".join(f'<a href="#item-{esc(i["id"])}">{esc(i["id"])}</a> ({change(i):+.2f})' for i in chosen)
        parts.append(f"{label}: {links or 'none'}")
    return "<p>" + "<br>".join(parts) + "</p>"


def pairs_html(pairs: dict) -> str:
    beta, shown = pairs["beta"], len(pairs["pairs"])
    blocks = []
    for pair, ref in pairs["pairs"]:
        logps = ("no stored reference log-probs" if ref is None else
                 f"log &pi;<sub>ref</sub>(y+|x) {ref['ref_chosen_logps']:.3f} ({ref['chosen_length']} tokens), "
                 f"log &pi;<sub>ref</sub>(y&minus;|x) {ref['ref_rejected_logps']:.3f} "
                 f"({ref['rejected_length']} tokens)")
        responses = "".join(
            f"<div class=answer><div><b>{label}</b> <span class=numbers>"
            f"{'stopped' if pair.get(f'{key}_stopped', True) else 'cut at the token limit'}</span></div>"
            f"<div class=text>{esc(pair[key][0]['content'])}</div></div>"
            for key, label in (("chosen", "y+ ~ &pi;<sub>ref</sub>(.|x)"),
                               ("rejected", "y&minus; ~ &pi;<sub>ref</sub>(.|x&prime;)")))
        blocks.append(f"<details class=pair id=\"pair-{esc(pair['id'])}\">"
                      f"<summary>{esc(pair['id'])}: {logps}</summary>"
                      f"{messages('x, the prompt', pair['prompt'])}"
                      f"{messages('x′, the prompt y− was sampled from', pair.get('negative_prompt') or [])}"
                      f"<div class=answers>{responses}</div></details>")
    more = f" (the first {shown} of {pairs['total']}; all are in pairs.jsonl)" if shown < pairs["total"] else ""
    return (f"<h2>The training pairs{more}</h2><p class=note>Both responses are stored under x. The implicit reward "
            f"of a response is &beta; (log &pi;(y|x) &minus; log &pi;<sub>ref</sub>(y|x)), &beta; = {beta:g}: 0 "
            "for every pair before training, where &pi; = &pi;<sub>ref</sub>. After training it would take one more "
            "forward pass of the trained model over every pair, which train.py does not run (metrics.jsonl keeps "
            "each step's means over its batch, measured before the step's update); shown here are the stored "
            "reference log-probs of reference.jsonl.</p>" + "".join(blocks))


def render_page(title: str, names: list[str], items: list[dict], note: str, pairs: dict | None = None) -> str:
    """The page: the summary table, the legend, links to the largest changes, then the items, largest |change|
    first (the largest gains and the largest losses at the top), then the pairs."""
    ordered = sorted(items, key=lambda i: (change(i) is None, -abs(change(i) or 0)))
    scale = nice_scale([t for item in items for a in item["answers"] for t in (a["terms"] or [])])
    body = [f"<h1>{esc(title)}</h1>", f"<p class=note>{esc(note)} pmi = log &pi;<sub>ref</sub>(y|x) &minus; "
            "log &pi;<sub>ref</sub>(y|x&prime;) under the base model, summed over the answer's tokens.</p>"]
    if items:
        body += ["<h2>Summary</h2>", summary_table(names, items), legend(scale), extremes(ordered),
                 "<h2>Held-out prompts, largest change in pmi first</h2>"]
        body += [item_html(rank, item, names, scale) for rank, item in enumerate(ordered, 1)]
    if pairs is not None:
        body.append(pairs_html(pairs))
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><meta name=viewport "
            f"content=\"width=device-width\"><title>{esc(title)}</title><style>{CSS}{shade_css()}</style></head>"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")
