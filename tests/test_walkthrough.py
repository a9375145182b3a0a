"""docs/walkthrough.md and examples/walkthrough.py: every `file.py:function` the walkthrough names exists, every
formula block names one, every command it shows parses with the current flags, and the tiny example (a real
train.py run on the bundled SmolLM2-135M) prints the invariants the paper talks about: one full pair, its
reference log-probs, rewards 0 and loss ln 2 at step 0, the steps after it, and the MI meter before and after."""
import ast
import importlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "walkthrough.md"
EXAMPLE = ROOT / "examples" / "walkthrough.py"
CORE = ("model_loader", "sampler", "mipo", "dpo_loss", "train", "eval")

# mipo.py:build_pairs
CODE_REF = re.compile(r"\b((?:(?:formats|transforms|bookkeeping)/)?[a-z_]+)\.py:([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)")
TEST_REF = re.compile(r"`(tests/test_[a-z_]+\.py)::([A-Za-z_][A-Za-z0-9_]*)`")  # tests/test_x.py::test_y


def defined_names(path: Path) -> set[str]:
    """The names a file defines at its top level (def, class, assignment): not the ones it imports."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def resolves(module: str, name: str) -> bool:
    """True when `module.py:name` names something that file defines (dotted: an attribute of it, e.g. a method)."""
    path = ROOT / f"{module}.py"
    first, *rest = name.split(".")
    if not path.is_file() or first not in defined_names(path):
        return False  # misspelled, or imported into that file from another: the reference names the wrong file
    obj = getattr(importlib.import_module(module.replace("/", ".")), first)
    for part in rest:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def code_refs(text: str) -> set[tuple[str, str]]:
    return {(m.group(1), m.group(2).rstrip(".")) for m in CODE_REF.finditer(text)}


def test_the_reference_checker_can_fail():
    assert resolves("mipo", "build_pairs") and resolves("formats/tokenizer", "Tokenizer.apply_chat_template")
    assert not resolves("mipo", "build_pair")  # misspelled function
    assert not resolves("formats/tokenizer", "Tokenizer.apply_template")  # misspelled attribute
    assert not resolves("model_loader", "Tokenizer")  # imported into model_loader.py, defined in formats/tokenizer.py
    assert not resolves("mipoo", "build_pairs")  # misspelled file
    assert (code_refs("see `mipo.py:build_pairs`, then dpo_loss.py:sigmoid_loss.")
            == {("mipo", "build_pairs"), ("dpo_loss", "sigmoid_loss")})


def test_every_function_the_walkthrough_names_exists():
    text = DOC.read_text()
    refs = code_refs(text)
    missing = sorted(f"{m}.py:{n}" for m, n in refs if not resolves(m, n))
    assert not missing, f"docs/walkthrough.md names functions that do not exist: {missing}"
    assert len(refs) >= 50, f"only {len(refs)} references found: the pattern no longer matches the document?"
    assert {m for m, _ in refs} >= set(CORE), f"core files never referenced: {set(CORE) - {m for m, _ in refs}}"
    tests = TEST_REF.findall(text)
    assert tests
    for path, name in tests:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name} does not exist"


def test_every_formula_names_the_function_that_computes_it():
    method = DOC.read_text().split("## The method, step by step")[1].split("\n## ")[0]
    steps = method.split("\n### ")[1:]
    assert len(steps) >= 12
    for step in steps:
        if "```text" in step:
            refs = [r for r in code_refs(step) if resolves(*r)]
            assert refs, f"step {step.splitlines()[0]!r} has a formula but names no existing function"


def shown_commands(text: str) -> list[list[str]]:
    """The `python SCRIPT ...` lines of the document's bash blocks, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("python ") and not line.startswith("python3 -m"):
                commands.append(shlex.split(line)[1:])
    return commands


def test_every_command_in_the_walkthrough_parses_with_the_current_flags():
    import mipo
    from bookkeeping import config, sweep

    sys.path.insert(0, str(EXAMPLE.parent))
    import walkthrough

    # train.py: resolve_config also checks the loss options
    parsers = {"train.py": lambda argv: [config.resolve_config(args)
                                         for args in sweep.variants(config.train_parser().parse_args(argv))],
               "eval.py": config.eval_parser().parse_args, "mipo.py": mipo.pairs_parser().parse_args,
               "examples/walkthrough.py": walkthrough.parse_args}
    commands = shown_commands(DOC.read_text())
    scripts = [c[0] for c in commands]
    assert scripts.count("train.py") >= 6 and "eval.py" in scripts and "mipo.py" in scripts
    assert any(c[0] == "eval.py" and "--compare" in c for c in commands)
    for flag in ("--loss", "--beta", "--negative", "--n"):  # the ablation section: one flag each
        assert any(c[0] == "train.py" and flag in c for c in commands), flag
    for script, *argv in commands:
        parsers[script](argv)  # an unknown flag or a bad value raises (MipoError or SystemExit)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The example with even smaller settings than its defaults: 4 pairs, 2 DPO steps, 2 held-out prompts; no warmup,
    so that the first step moves the model (the paper's warmup runs step 1 at lr 0)."""
    tmp = tmp_path_factory.mktemp("walkthrough")
    out = tmp / "run"
    argv = ["--n", "4", "--n-eval", "2", "--max-new-tokens", "16", "--batch-size", "2", "--warmup-ratio", "0",
            "--out", str(out)]
    result = subprocess.run([sys.executable, str(EXAMPLE), *argv], capture_output=True, text=True, cwd=tmp,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout, out


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"not printed: {pattern}"
    return float(m.group(1))


def test_example_prints_one_full_pair_and_its_reference_log_probs(example):
    stdout, out = example
    pair = json.loads((out / "pairs.jsonl").read_text().splitlines()[0])
    ref = json.loads((out / "reference.jsonl").read_text().splitlines()[0])
    assert ref["id"] == pair["id"] and f"pair 0 ({pair['id']})" in stdout
    quoted = "".join(line.split("| ", 1)[1] for line in stdout.splitlines() if line.strip().startswith("|"))
    for key in ("prompt", "negative_prompt", "chosen", "rejected"):
        text = pair[key][0]["content"]
        assert text.strip() and "".join(text.split()) in "".join(quoted.split()), f"{key} is not printed in full"
    assert "chosen y+ ~ pi_ref(.|x)" in stdout and "rejected y- ~ pi_ref(.|x')" in stdout
    assert (number(r"log pi_ref\(y\+\|x\) = +(-?[\d.]+) nats", stdout)
            == pytest.approx(ref["ref_chosen_logps"], abs=1e-3))
    assert (number(r"log pi_ref\(y-\|x\) = +(-?[\d.]+) nats", stdout)
            == pytest.approx(ref["ref_rejected_logps"], abs=1e-3))
    # train.py's packed forward and mipo.response_logps are separate code paths; in float32 they agree closely
    assert number(r"agree to ([\d.e+-]+) nats", stdout) < 1e-3


def test_example_prints_step_zero_rewards_zero_and_loss_ln2_then_the_steps(example):
    stdout, out = example
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2  # 4 pairs, 2 per step
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[0]["rewards/chosen"] == 0 and history[0]["rewards/rejected"] == 0
    assert "max |log pi - log pi_ref| = 0.00e+00 nats   (train.py:step0_check: OK)" in stdout
    assert "rewards/chosen = 0.0000   rewards/rejected = 0.0000" in stdout
    assert f"loss = 0.6931   ln 2 = {math.log(2):.4f}" in stdout
    rows = re.findall(r"^ +(\d+) +([\d.e+-]+) +([\d.]+) +([\d.]+) ", stdout, re.M)
    assert [int(r[0]) for r in rows] == [1, 2]
    assert [float(r[2]) for r in rows] == pytest.approx([m["loss"] for m in history], abs=1e-4)
    assert f"after 2 steps: loss 0.6931 -> {history[-1]['loss']:.4f}" in stdout


def test_example_prints_the_mi_meter_before_and_after(example):
    stdout, out = example
    summary = json.loads((out / "summary.json").read_text())
    before = number(r"MI before \(base model's answers\) +(-?[\d.]+) nats", stdout)
    after = number(r"MI after +\(trained model's answers\) +(-?[\d.]+) nats", stdout)
    assert before == pytest.approx(summary["base_eval"]["pmi"], abs=1e-3)
    assert after == pytest.approx(summary["trained_eval"]["pmi"], abs=1e-3)
    assert (number(r"scored by the trained model itself: (-?[\d.]+) nats", stdout)
            == pytest.approx(summary["trained_eval"]["pmi_self"], abs=1e-3))
    # train.py's meter scores the trained model's samples under the BASE model: recomputed by the example, equal
    assert number(r"scored under the BASE model here: (-?[\d.]+) nats", stdout) == pytest.approx(after, abs=1e-3)


def test_example_prints_the_path_of_its_page(example):
    stdout, out = example
    assert f"shaded by its term of the base model's pmi, and the pairs: {out / 'pmi.html'}\n" in stdout
    page = (out / "pmi.html").read_text()
    held_out = [json.loads(line)["id"] for line in (out / "eval_pairs.jsonl").read_text().splitlines()]
    assert len(held_out) == 2 and all(f'id="item-{item_id}"' in page for item_id in held_out)


def test_training_moved_the_model(example):
    # Not only the run's files agreeing with each other: the update went the way DPO pushes, and the saved weights
    # are not the base model's.
    _, out = example
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["rewards/margins"] == 0 and history[1]["rewards/margins"] > 0
    from safetensors.torch import load_file

    from model_loader import resolve_model_dir

    trained, base = (load_file(out / "final" / "model.safetensors"),
                     load_file(resolve_model_dir("llama") / "model.safetensors"))
    assert max((trained[k].float() - base[k].float()).abs().max().item() for k in trained) > 1e-5


def test_every_function_the_example_prints_exists(example):
    stdout, _ = example
    refs = code_refs(stdout)
    assert len(refs) >= 8
    assert all(resolves(m, n) for m, n in refs), sorted(f"{m}.py:{n}" for m, n in refs if not resolves(m, n))
