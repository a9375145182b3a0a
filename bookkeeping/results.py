"""The machinery of eval.py, which a reader of the evaluation can skip: which models and held-out items the flags
name (checked before anything is downloaded), where each model's results are cached (a run directory -> RUN/eval,
a model directory or a bundled name -> runs/eval/NAME), and the cache itself, reused only for the same settings,
items and weight files.
"""
import hashlib
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import mipo
from bookkeeping import config, pmi_page, report, sweep
from formats.dtypes import torch_dtype
from formats.files import (EVAL_SUBDIR, OTHER_MODELS_DIR, RUN_CONFIG, RUN_FINAL, RUN_METRICS, MipoError,
                           numbered_jsonl, read_json, read_jsonl, write_atomically)
from formats.gguf_convert import BUNDLED, BUNDLED_ALIASES
from formats.hf_files import weight_files
from formats.model_sources import is_hub_name, resolve_model_dir
from model_loader import check_model, load_model
from sampler import Sampling
from tasks import Example, Task, eval_sampling, get_task, load_examples
from transforms import cpu_speedups


def plan(args) -> tuple[list[dict], Task, list[Example], dict]:
    """What eval.py's flags ask for, every name checked before any evaluation: the models (resolve), the task, its
    held-out items and the settings every model is evaluated with. Sets args.torch_dtype."""
    check_flags(args)  # before anything is downloaded, converted or fetched
    specs = models_to_evaluate(args)
    task, examples, settings = held_out_items(args, specs)
    if args.model is not None and args.out:
        specs[0]["eval_dir"] = Path(args.out)
    return specs, task, examples, settings


def check_flags(args) -> None:
    """Every flag and name that can be checked without a download: one line and nothing fetched when one is bad."""
    if (args.model is None) == (args.compare is None):
        raise MipoError("pass --model MODEL to evaluate one model, or --compare BASE RUN [RUN ...]")
    if args.compare is not None and len(args.compare) < 2:
        raise MipoError(f"--compare {' '.join(args.compare)}: needs a base and at least one run")
    if args.task is not None:
        get_task(args.task)
    for flag, value in (("--batch-size", args.batch_size), ("--n", args.n)):
        if value is not None and value < 1:
            raise MipoError(f"{flag} {value}: must be at least 1")
    mipo.sampling_from_flags(args, Sampling(1.0))  # the sampling flags given are in range
    if args.judge_reference is not None:
        read_reference_answers(Path(args.judge_reference))


def models_to_evaluate(args) -> list[dict]:
    """--model or --compare, every name resolved (a run, a model directory, a bundled or hub name) before any work."""
    wanted = []
    for name in args.compare or [args.model]:  # a sweep's directory stands for its variants' run directories
        wanted += [str(d) for d in sweep.variant_dirs(name) or [name]]
    if args.revision is not None and not any(is_hub_name(name) for name in wanted):
        raise MipoError(f"--revision {args.revision}: pins a Hugging Face hub model (owner/name), and none of "
                        f"{', '.join(wanted)} is one; leave --revision out")
    return [resolve(name, args.revision) for name in wanted]


def held_out_items(args, specs: list[dict]) -> tuple[Task, list[Example], dict]:
    """The task, its held-out items and the settings every model is evaluated with: the flags, else the first run's
    config.json. Sets args.torch_dtype."""
    run_settings = next((run_data_settings(s["run"]) for s in specs[1:] + specs[:1] if s["run"] is not None), {})
    trained_on = {s["name"]: run_data_settings(s["run"]).get("task") for s in specs if s["run"] is not None}
    if args.task is None and len(set(trained_on.values())) > 1:
        tasks = ", ".join(f"{name}: {task}" for name, task in trained_on.items())
        raise MipoError(f"--compare: the runs were trained on different tasks ({tasks}); "
                        "pass --task to evaluate them all on one")
    task_name = args.task or run_settings.get("task")
    if task_name is None:
        raise MipoError("--task is required: no run directory among the models says which task it was trained on")
    task = get_task(task_name)
    same_task = task_name == run_settings.get("task")
    data = args.data or (run_settings.get("data") if same_task else None)
    eval_data = args.eval_data or (run_settings.get("eval_data") if same_task and not args.data else None)
    n = args.n or config.EVAL_N_DEFAULT["cpu" if torch.device(args.device).type == "cpu" else "gpu"]
    examples = load_examples(task, "eval", n, data, eval_data)
    sampling = mipo.sampling_from_flags(args, eval_sampling(task, args.device))
    args.torch_dtype = torch_dtype(args.dtype, args.device)  # as train.py: bf16 where the hardware multiplies it
    settings = {"task": task.name, "data": str(data) if data else None,
                "eval_data": str(eval_data) if eval_data else None,
                "n": len(examples), "sampling": asdict(sampling),
                "seed": args.seed, "mi": not args.no_mi, "dtype": str(args.torch_dtype).removeprefix("torch.")}
    if task.name == "gsm8k":
        settings["answer_fallback"] = args.answer_fallback
    return task, examples, settings


def mi_reference(args, specs: list[dict]) -> dict:
    """The base model whose pointwise MI is the headline meter: --mi-reference, else the base of --compare, else
    the model a run was trained from (its config.json), else the evaluated model itself."""
    if args.mi_reference:
        return resolve(args.mi_reference)
    if args.compare is not None:
        return specs[0]
    base = run_data_settings(specs[0]["run"]).get("model") if specs[0]["run"] is not None else None
    return resolve(base) if base else specs[0]


def judge_reference(args, task: Task, examples: list[Example]) -> tuple[dict, list[dict]] | None:
    """The fixed reference answer per item that every model's answer is judged against (the paper: the dataset's
    human-chosen response): --judge-reference's answers, as one more "model" to judge, cached by the file's content.
    None without the flag: the base model's answers are the reference."""
    if args.judge_reference is None:
        return None
    path = Path(args.judge_reference)
    answers = read_reference_answers(path)
    missing = [ex.id for ex in examples if ex.id not in answers]
    if missing:
        raise MipoError(f"{path}: no reference answer for held-out item {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    spec = {"name": f"reference ({path.name})", "model": None, "run": None,
            "eval_dir": OTHER_MODELS_DIR / "judge-reference" / f"{path.stem}-{digest}"}
    items = load_results(spec["eval_dir"], task, {"file": digest}, [ex.id for ex in examples])
    if items is None:
        items = [{"id": ex.id, "response": answers[ex.id], "metrics": {}} for ex in examples]
        save_results(spec["eval_dir"], task, items, {"model": spec["name"], "settings": {"file": digest}})
    return spec, items


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


def load(model_arg, args):
    """(model, tokenizer) in eval.py's dtype, with the CPU speed-ups the commands switch on."""
    model, tokenizer = load_model(model_arg, args.device, args.torch_dtype)
    cpu_speedups.apply(model)
    model.compile_decode = args.compile  # --compile: sampler.generate reads it
    return model, tokenizer


def cached(spec: dict, task: Task, examples: list[Example], settings: dict, force: bool) -> tuple[dict, list | None]:
    """(the settings a model is evaluated with: the flags' sampling with the model's own defaults filled in, and its
    weight files; its cached items made with exactly those, or None)."""
    in_force = mipo.resolve_sampling(Sampling(**settings["sampling"]), spec["model"])  # the model's top-k, penalty
    settings = {**settings, "sampling": asdict(in_force), "model_files": fingerprint(spec["model"])}
    items = None if force else load_results(spec["eval_dir"], task, settings, [ex.id for ex in examples])
    if items is not None:
        print(f"{spec['name']}: {task.name} results from {spec['eval_dir']}", file=sys.stderr)
    return settings, items


def save_evaluation(spec: dict, task: Task, items: list[dict], settings: dict, seconds: float, device: str) -> None:
    """A fresh evaluation's items and summary; the terms per token of the items it replaces are gone with them."""
    pmi_page.tokens_file(spec["eval_dir"], task.name).unlink(missing_ok=True)
    save_results(spec["eval_dir"], task, items, {"model": spec["name"], "model_dir": spec["model"], "task": task.name,
                                                 "settings": settings, "seconds": round(seconds, 1),
                                                 "machine": report.machine(device), "metrics": report.summarize(items)})


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


def save_results(eval_dir: Path, task: Task, items: list[dict], summary: dict) -> None:
    write_atomically(eval_dir / f"{task.name}.jsonl",
                     "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    write_atomically(eval_dir / f"{task.name}.summary.json", json.dumps(summary, indent=2) + "\n")


def update_summary(spec: dict, task: Task, items: list[dict], **fields) -> None:
    """Save the items and their summary, with the metrics summarized anew and the given fields replaced."""
    summary_path = spec["eval_dir"] / f"{task.name}.summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update(metrics=report.summarize(items), **fields)
    save_results(spec["eval_dir"], task, items, summary)


def fingerprint(model_arg: str) -> list:
    """Name, size and modification time of each weight file: a retrained run never reuses stale results."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in weight_files(resolve_model_dir(model_arg))]
