"""Where eval.py's results live, which a reader of the evaluation can skip: a run directory, a model directory or a
bundled name -> the model to load and the directory its results are cached in (RUN/eval, or runs/eval/NAME), and
the cache itself, reused only for the same settings, items and weight files.
"""
import json
import re
from pathlib import Path

from model_loader import check_model
from tasks import Task
from plumbing import report
from plumbing.files import (EVAL_SUBDIR, OTHER_MODELS_DIR, RUN_CONFIG, RUN_FINAL, RUN_METRICS, MipoError,
                            numbered_jsonl, read_json, read_jsonl, write_atomically)
from plumbing.gguf_convert import BUNDLED, BUNDLED_ALIASES
from plumbing.hf_files import weight_files
from plumbing.model_sources import is_hub_name, resolve_model_dir


def is_run_dir(path: Path) -> bool:
    return (path / RUN_FINAL).is_dir() or (path / RUN_METRICS).is_file()


def resolve(name_or_path: str, revision: str | None = None) -> dict:
    """{name, model (what load_model takes), run (the run directory or None), eval_dir}. A hub name (owner/name) is
    downloaded at revision and then treated as the local directory it is in. The model is checked (config.json,
    tokenizer, tensor shapes) without loading it, so that a bad one fails before any evaluation is written."""
    spec = locate(name_or_path, revision)
    check_model(spec["model"])
    return spec


def locate(name_or_path: str, revision: str | None = None) -> dict:
    path = resolve_model_dir(name_or_path, revision) if is_hub_name(name_or_path) else Path(name_or_path)
    if path.name == RUN_FINAL and is_run_dir(path.parent):  # RUN/final: the run's own results
        path = path.parent
    if path.is_dir() and is_run_dir(path):
        if not (path / RUN_FINAL / "config.json").is_file():
            raise MipoError(f"{path}: run directory without a trained model ({RUN_FINAL}/config.json is missing); "
                            "let train.py finish, or pass a model directory")
        return {"name": str(name_or_path), "model": str(path / RUN_FINAL), "run": path, "eval_dir": path / EVAL_SUBDIR}
    if str(name_or_path) in {*BUNDLED, *BUNDLED_ALIASES}:
        return {"name": str(name_or_path), "model": str(name_or_path), "run": None,
                "eval_dir": OTHER_MODELS_DIR / str(name_or_path)}
    if not path.exists():
        raise MipoError(f"{path}: no such run directory or model (a train.py run directory, a Hugging Face model "
                        f"directory, or a bundled name: {', '.join([*BUNDLED, *BUNDLED_ALIASES])})")
    if not (path / "config.json").is_file():
        raise MipoError(f"{path}: neither a train.py run directory (no {RUN_FINAL}/ or {RUN_METRICS}) "
                        "nor a Hugging Face model directory (no config.json)")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(path.resolve()).strip("/"))
    return {"name": str(name_or_path), "model": str(path), "run": None, "eval_dir": OTHER_MODELS_DIR / slug}


def run_data_settings(run: Path) -> dict:
    """{model, task, data, eval_data} of a run: train.py keeps them in the "pairs" section of its config.json."""
    settings = read_json(run / RUN_CONFIG) if (run / RUN_CONFIG).is_file() else {}
    pairs = settings.get("pairs") if isinstance(settings.get("pairs"), dict) else settings
    return {key: pairs.get(key) for key in ("model", "task", "data", "eval_data")}


def fingerprint(model_arg: str) -> list:
    """Name, size and modification time of each weight file: a retrained run never reuses stale results."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in weight_files(resolve_model_dir(model_arg))]


def save_results(eval_dir: Path, task: Task, items: list[dict], summary: dict) -> None:
    write_atomically(eval_dir / f"{task.name}.jsonl",
                     "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    write_atomically(eval_dir / f"{task.name}.summary.json", json.dumps(summary, indent=2) + "\n")


def load_results(eval_dir: Path, task: Task, settings: dict, ids: list[str]) -> list[dict] | None:
    """The cached items when they were made with exactly these settings for exactly these items, else None."""
    summary_path, items_path = eval_dir / f"{task.name}.summary.json", eval_dir / f"{task.name}.jsonl"
    if not (summary_path.is_file() and items_path.is_file()):
        return None
    try:
        summary, items = read_json(summary_path), read_jsonl(items_path)
    except MipoError:
        return None  # a damaged cache is evaluated again, not trusted
    if summary.get("settings") != settings or [item.get("id") for item in items] != ids:
        return None
    return items


def update_summary(spec: dict, task: Task, items: list[dict], **fields) -> None:
    """Save the items and their summary, with the metrics summarized anew and the given fields replaced."""
    summary_path = spec["eval_dir"] / f"{task.name}.summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update(metrics=report.summarize(items), **fields)
    save_results(spec["eval_dir"], task, items, summary)


def read_reference_answers(path: Path) -> dict[str, str]:
    """--judge-reference: one JSON object a line, {"id": item id, "answer": the reference answer}."""
    if not path.is_file():
        raise MipoError(f"{path}: file not found (--judge-reference)")
    answers = {}
    for lineno, row in numbered_jsonl(path):
        if not (isinstance(row, dict) and isinstance(row.get("id"), (str, int)) and isinstance(row.get("answer"), str)):
            raise MipoError(f"{path}:{lineno}: needs fields 'id' (the held-out item's id) and 'answer' (a string)")
        answers[str(row["id"])] = row["answer"]
    return answers
