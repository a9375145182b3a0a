"""The pairs file mipo.py writes, and what an interrupted sampling run resumes from: reading it, checking that a
file on disk was made by the same run, and the date its prompts were rendered on.

The pairs file is JSONL in TRL's conversational preference format, plus where the negative came from:
  {"id", "task", "prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
   "rejected": [{"role": "assistant", ...}], "negative": "random" | "incomplete" | "random-resample",
   "negative_source", "negative_prompt": [...], "chosen_stopped", "rejected_stopped", "sampling": {...}}
*_stopped: the response ended with a stop token (False: cut at max_new_tokens). It is written whole, once every
response is sampled; the sampling itself goes to a samples file beside it (PAIRS.samples.jsonl), one line per prompt
and batch by batch, which is what an interrupted run resumes.
"""
from datetime import date
from pathlib import Path

from formats.files import MipoError, numbered_jsonl


PAIR_FIELDS = (
    "id", "task", "prompt", "chosen", "rejected", "negative", "negative_source", "negative_prompt", "sampling",
)
SAMPLE_FIELDS = ("id", "task", "negative", "sampling", "chosen", "chosen_stopped")


def read_pairs(path) -> list[dict]:
    """Every record of a pairs (or samples) file, each with the fields this project writes."""
    path = Path(path)
    if not path.is_file():
        raise MipoError(f"{path}: pairs file not found")
    fields = SAMPLE_FIELDS if path.name.endswith(".samples.jsonl") or ".samples.rank" in path.name else PAIR_FIELDS
    records = numbered_jsonl(path)
    for lineno, record in records:
        missing = [k for k in fields if not isinstance(record, dict) or k not in record]
        if missing:
            raise MipoError(f"{path}:{lineno}: field {missing[0]!r} is missing")
    return [record for _, record in records]


def samples_path(pairs_path, shard: tuple[int, int] = (0, 1)) -> Path:
    pairs_path, (rank, world) = Path(pairs_path), shard
    return pairs_path.with_name(
        f"{pairs_path.stem}.samples.jsonl" if world == 1
        else f"{pairs_path.stem}.samples.rank{rank}-of-{world}.jsonl"
    )


def same_run(record: dict, task, negative: str, settings: dict) -> bool:
    """Whether a pairs or samples record was made by a run with these settings (the recorded date aside)."""
    recorded = (
        {k: v for k, v in record["sampling"].items() if k != "date"} if isinstance(record["sampling"], dict) else None
    )
    return (record["task"], record["negative"], recorded) == (task.name, negative, settings)


def resume_samples(path: Path, records: list[dict], tokenizer, task, negative: str, settings: dict) -> set[str]:
    """The ids of `records`, already sampled into `path` by a run with these settings; a file of another run is
    refused. Sets the date the chat template renders and records it in settings."""
    for k, record in enumerate(records, 1):
        missing = [f for f in SAMPLE_FIELDS if not isinstance(record, dict) or f not in record]
        if missing:
            raise MipoError(f"{path}: record {k}: field {missing[0]!r} is missing")
        if not same_run(record, task, negative, settings):
            raise MipoError(f"{path}: holds samples of another run ({record['task']}, --negative {record['negative']}, "
                            f"{record['sampling']}); pass another --out or delete the file")
    # The date a chat template may print (Llama 3's "Today Date") is part of every prompt: fixed for the run
    # and recorded, so that the reference pass and a rerun on another day render the same prompts.
    use_recorded_date(tokenizer, records, path)
    settings["date"] = tokenizer.date.isoformat()
    return {record["id"] for record in records}


def read_complete_pairs(path, task, examples: list, negative: str, settings: dict) -> list[dict] | None:
    """The pairs file of this run when it has been written (None when not yet); a pairs file of another run is
    refused, never mixed with this one."""
    if not Path(path).exists():
        return None
    pairs = read_pairs(path)
    if (
        [p["id"] for p in pairs] != [ex.id for ex in examples]
        or not all(same_run(p, task, negative, settings) for p in pairs)
    ):
        raise MipoError(
            f"{path}: holds the pairs of another run (other prompts, task, --negative or sampling settings); "
            "pass another --out or delete the file"
        )
    return pairs


def use_recorded_date(tokenizer, records: list[dict], path) -> None:
    """Render chat templates with the date recorded with the records (mipo.sample_pairs), if any."""
    dates = {r["sampling"].get("date") for r in records if isinstance(r.get("sampling"), dict)}
    if len(dates) > 1:
        raise MipoError(
            f"{path}: its records were rendered on different dates {sorted(map(str, dates))}; delete the file"
        )
    if dates and None not in dates:
        tokenizer.date = date.fromisoformat(dates.pop())
