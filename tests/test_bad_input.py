"""Validate, then write: each of train.py, mipo.py and eval.py refuses bad input with one line on stderr that starts
`error: `, exit status 2, and leaves the file system exactly as it was (names, sizes and modification times of
everything under the test's directory, which holds the inputs and the --out path). Tiny models, no download."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from bookkeeping import config
from formats.files import read_json
from formats.gguf_convert import BUNDLED
from test_eval import write_run
from test_train import args_for, write_prompts, write_tiny_model

REPO = Path(__file__).resolve().parent.parent


def listing(root: Path) -> dict:
    """Every path under root with its size and modification time."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def changed_tensor(model: Path, name: str, tensor=None):
    """The model's safetensors file without the tensor `name`, or with it replaced by `tensor`."""
    state = load_file(model / "model.safetensors")
    state.pop(name) if tensor is None else state.update({name: tensor})
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})


def fake_bundled_cache(cache: Path) -> Path:
    """A MIPO_CACHE where the bundled qwen's packages are fetched and its joined GGUF file is cut short: what an
    interrupted copy or a full disk leaves. Nothing needs downloading: a fetched package is a directory."""
    for package, version, _ in BUNDLED["qwen"].parts:
        (cache / "packages" / f"{package}-{version}").mkdir(parents=True)
    (cache / "gguf").mkdir()
    (cache / "gguf" / "qwen.gguf").write_bytes(b"GGUF" + bytes(1000))
    return cache


def other_model_pairs(path: Path) -> Path:
    pair = {"id": "q0", "task": "jsonl", "prompt": [{"role": "user", "content": "w1 w2"}],
            "chosen": [{"role": "assistant", "content": "w3"}], "rejected": [{"role": "assistant", "content": "w4"}],
            "negative": "random", "negative_source": "q1", "negative_prompt": [{"role": "user", "content": "w5"}],
            "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6, "seed": 0, "model": "qwen"}}
    path.write_text(json.dumps(pair) + "\n")
    return path


def other_run(tmp: Path, model: Path, data: Path) -> Path:
    """A run directory whose config.json holds the same command's settings at another --lr."""
    out = tmp / "run"
    argv = args_for({"model": model, "data": data}, out, "--lr", "2e-3")
    pairs, loss, opt, hw, _ = config.resolve_config(config.train_parser().parse_args(argv))
    out.mkdir()
    settings = {"pairs": asdict(pairs), "loss": asdict(loss), "optim": asdict(opt), "hardware": asdict(hw)}
    (out / "config.json").write_text(json.dumps(settings))
    return out


def two_tasks(tmp: Path, model: Path, data: Path) -> list[str]:
    """--compare BASE A B where run A was trained on jsonl and run B on gsm8k."""
    a, b = write_run(tmp / "run-a", data, 1), write_run(tmp / "run-b", data, 2)
    settings = read_json(b / "config.json")
    settings["pairs"]["task"] = "gsm8k"
    (b / "config.json").write_text(json.dumps(settings))
    return ["--compare", str(model), str(a), str(b), "--judge", "none"]


def model_with(change):
    """--model: a copy of the tiny model, changed by change(copy)."""
    def model(tmp, base):
        changed = Path(shutil.copytree(base, tmp / "model-copy"))
        change(changed)
        return changed
    return model


def data_file(content: bytes):
    """--data: a file of these bytes."""
    def data(tmp, _):
        (tmp / "data.jsonl").write_bytes(content)
        return tmp / "data.jsonl"
    return data


def empty_dir(name: str):
    def make(tmp, *_):
        (tmp / name).mkdir()
        return tmp / name
    return make


def train(*extra, model=lambda tmp, model: model, data=lambda tmp, data: data, more=lambda tmp, model, data: []):
    """train.py's arguments: tests/test_train.py's args_for (--out tmp/out) with these changes."""
    def argv(tmp, base_model, base_data):
        args = args_for({"model": model(tmp, base_model), "data": data(tmp, base_data)}, tmp / "out", *extra)
        return [*args, *more(tmp, base_model, base_data)]
    return argv


def a_file(tmp, *_):
    (tmp / "f").write_text("x")
    return ["--out", str(tmp / "f")]


def set_model_type(model: Path):
    (model / "config.json").write_text((model / "config.json").read_text().replace('"llama"', '"gpt2"'))


def shorten_norm(model: Path):
    changed_tensor(model, "model.norm.weight", load_file(model / "model.safetensors")["model.norm.weight"][:-1])


def cut_short(model: Path):
    os.truncate(model / "model.safetensors", (model / "model.safetensors").stat().st_size - 100)


# Each case: (command line, its arguments from (tmp, model, data), extra environment, a piece of the one line).
CASES = {
    "unknown bundled name": ("train.py", train(model=lambda *_: "qwne"), {}, "qwne: no such model directory"),
    "no config.json": ("train.py", train(model=empty_dir("empty")), {},
                       "empty: not a Hugging Face model directory (no config.json)"),
    "unsupported model_type": ("train.py", train(model=model_with(set_model_type)), {},
                               "model_type 'gpt2' is not supported"),
    "tensor missing": ("train.py", train(model=model_with(lambda m: changed_tensor(m, "model.norm.weight"))), {},
                       "checkpoint lacks 1 tensor(s), e.g. 'model.norm.weight'"),
    "tensor of the wrong shape": ("train.py", train(model=model_with(shorten_norm)), {},
                                  "tensor 'model.norm.weight' has shape (47,), config.json implies (48,)"),
    "safetensors cut short": ("train.py", train(model=model_with(cut_short)), {}, "cannot read safetensors file"),
    "corrupt cached GGUF": ("train.py", train(model=lambda *_: "qwen"), {"MIPO_CACHE": "{tmp}/cache"},
                            "qwen.gguf is corrupt or incomplete (1,004 bytes; expected 491,400,064 bytes"),
    "data file missing": ("train.py", train(data=lambda tmp, _: tmp / "missing.jsonl"), {},
                          "missing.jsonl: file not found (--data)"),
    "data file empty": ("train.py", train(data=data_file(b"")), {}, "task jsonl: the train split is empty"),
    "data not UTF-8": ("train.py", train(data=data_file(b'{"prompt": "caf\xe9"}\n')), {},
                       "data.jsonl: not UTF-8 text (byte 15 is b'\\xe9')"),
    "data line not JSON": ("train.py", train(data=data_file(b'{"prompt": "w1"}\n{oops\n')), {},
                           "data.jsonl:2: not valid JSON"),
    "data without prompt": ("train.py", train(data=data_file(b'{"question": "w1"}\n')), {},
                            "data.jsonl:1: field 'prompt' is missing"),
    "pairs of another model": ("train.py",
                               train(more=lambda tmp, *_: ["--pairs", str(other_model_pairs(tmp / "p.jsonl"))]),
                               {}, "was sampled by model 'qwen', not --model"),
    "--out a file": ("train.py", train(more=a_file), {}, "/f is a file; pass a run directory"),
    "run directory of other settings": ("train.py", train(more=lambda *a: ["--out", str(other_run(*a))]), {},
                                        "holds a run with optim.lr = 0.002, this command asks for 0.001"),
    "temperature < 0": ("train.py", train("--temperature", "-0.5"), {}, "need --temperature >= 0"),
    "top-p 0": ("train.py", train("--top-p", "0"), {}, "0 < --top-p <= 1"),
    "top-p > 1": ("train.py", train("--top-p", "1.5"), {}, "0 < --top-p <= 1"),
    "max-new-tokens 0": ("train.py", train("--max-new-tokens", "0"), {}, "--max-new-tokens >= 1"),
    "beta 0": ("train.py", train("--beta", "0"), {}, "--beta 0.0: must be > 0"),
    "save-minutes -1": ("train.py", train("--save-minutes", "-1"), {}, "--save-minutes -1.0: must be at least 0"),
    "an option the loss does not take": ("train.py", train("--loss", "ipo", "--label-smoothing", "0.1"), {},
                                         "--loss ipo: label_smoothing has no meaning for loss 'ipo'"),
    # WORLD_SIZE is what torchrun sets; config reads it before any process group starts, so one process suffices.
    "batch the processes do not divide": ("train.py", train("--batch-size", "4"), {"WORLD_SIZE": "3", "RANK": "0"},
                                          "--batch-size 4 must be a multiple of --micro-batch-size 2 x 3 process(es)"),
    "fewer pairs than a batch": ("train.py", train("--batch-size", "8", more=lambda *_: ["--n", "4"]), {},
                                 "4 training pairs are fewer than one batch of --batch-size 8"),
    "mipo.py bad data": ("mipo.py", lambda tmp, model, _: [
        "--model", str(model), "--task", "jsonl", "--data", str(data_file(b'{"prompt": \n')(tmp, None)),
        "--out", str(tmp / "p.jsonl")], {}, "data.jsonl:1: not valid JSON"),
    "mipo.py --out a directory": ("mipo.py", lambda tmp, model, data: [
        "--model", str(model), "--task", "jsonl", "--data", str(data), "--out", str(tmp)], {},
        "is a directory; pass the file to write"),
    "eval.py bad model": ("eval.py", lambda tmp, model, data: [
        "--model", str(model_with(lambda m: changed_tensor(m, "lm_head.weight"))(tmp, model)), "--task", "jsonl",
        "--data", str(data), "--judge", "none"], {}, "checkpoint lacks 1 tensor(s), e.g. 'lm_head.weight'"),
    "eval.py --compare runs of two tasks": ("eval.py", two_tasks, {},
                                            "--compare: the runs were trained on different tasks"),
    "eval.py --compare a directory that is no run": ("eval.py", lambda tmp, model, _: [
        "--compare", str(model), str(empty_dir("notes")(tmp)), "--judge", "none"], {},
        "notes: neither a train.py run directory"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return write_tiny_model(root / "tiny"), write_prompts(root / "prompts.jsonl", 16)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_status_2_and_writes_nothing(inputs, tmp_path, case):
    script, argv, env, message = CASES[case]
    model, data = inputs
    tmp = tmp_path / "work"
    tmp.mkdir()
    if "MIPO_CACHE" in env:
        fake_bundled_cache(tmp / "cache")
    argv = argv(tmp, model, data)
    before, inputs_before = listing(tmp), listing(model.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **{k: v.format(tmp=tmp) for k, v in env.items()}}
    result = subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True, text=True, cwd=tmp,
                            env=env, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert listing(tmp) == before
    assert listing(model.parent) == inputs_before


# A bad flag costs nothing: each command checks its flags and names before it downloads a model, converts a bundled
# one or fetches a data package. The cache starts empty (MIPO_CACHE points at a folder that does not exist) and must
# still not exist when the command has refused.
FREE_REFUSALS = {
    "eval.py unknown task": ("eval.py", ["--model", "llama", "--task", "nosuch"], "--task nosuch: unknown task"),
    "eval.py --n 0": ("eval.py", ["--model", "llama", "--task", "persona", "--n", "0"], "--n 0: must be at least 1"),
    "eval.py bad sampling": ("eval.py", ["--model", "llama", "--task", "persona", "--top-p", "0"], "0 < --top-p <= 1"),
    "eval.py missing reference": ("eval.py",
                                  ["--model", "llama", "--task", "persona", "--judge-reference", "ref.jsonl"],
                                  "ref.jsonl: file not found (--judge-reference)"),
    "train.py unknown task": ("train.py", ["--model", "llama", "--task", "nosuch"], "--task nosuch: unknown task"),
    "train.py bad loss option": ("train.py", ["--model", "llama", "--loss", "ipo", "--label-smoothing", "0.1"],
                                 "label_smoothing has no meaning for loss 'ipo'"),
    "mipo.py unknown task": ("mipo.py", ["--model", "llama", "--task", "nosuch"], "--task nosuch: unknown task"),
    "mipo.py --n 0": ("mipo.py", ["--model", "llama", "--task", "persona", "--n", "0"], "--n 0: must be at least 1"),
}


@pytest.mark.parametrize("case", FREE_REFUSALS)
def test_a_bad_flag_is_refused_before_anything_is_fetched(tmp_path, case):
    script, argv, message = FREE_REFUSALS[case]
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIPO_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not cache.exists() and not (tmp_path / "hf").exists() and not (tmp_path / "runs").exists()
