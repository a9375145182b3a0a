"""The pointwise MI token by token, which a reader of the method can skip: the meter's per-token terms
log pi_ref(y_t | x, y_<t) - log pi_ref(y_t | x', y_<t) (mipo.pointwise_mi), written next to the meter's rows, one
JSON line per answer, and read back.

    RUN/base_eval.tokens.jsonl, RUN/trained_eval.tokens.jsonl    train.py's held-out meter, before and after
    RUN/eval/TASK.tokens.jsonl                                    eval.py's pmi, under the base model
"""
import json
from pathlib import Path

from formats.files import read_jsonl, write_atomically

TOKENS_SUFFIX = ".tokens.jsonl"


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
