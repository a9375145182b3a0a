"""Every benchmark's --tiny mode, end to end in a process of its own: it exits 0 and prints the rows and numbers its
full mode is read for, so a change that breaks a benchmark fails here rather than when someone next runs it."""
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NUM = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def run_tiny(script: str, *flags: str) -> str:
    """SCRIPT --tiny on one thread -> its standard output."""
    proc = subprocess.run([sys.executable, str(REPO / script), "--tiny", *flags], capture_output=True,
                          text=True,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(NUM, text)]


def check_sampler(out: str):
    """A positive tokens/s for both engines, in the per-engine lines and in the table, and the ratio between them."""
    for engine in ("transformers", "ours"):
        rate = re.search(rf"float32\s+{engine}\s+({NUM}) tok/s\s+({NUM})x", out)
        assert rate and float(rate[1]) > 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "| float32 |" in line]
    assert len(rows) == 1, out
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    hf, ours, speedup = float(cells[2]), float(cells[3]), float(cells[4].rstrip("x"))
    hf_mb, ours_mb = (float(x) for x in cells[5].split(" / "))
    assert hf > 0 and ours > 0 and hf_mb > 0 and ours_mb > 0, rows[0]
    assert speedup == pytest.approx(ours / hf, abs=0.01), rows[0]


def check_train_step(out: str):
    """A row per system with positive pairs/s, step time and memory and a finite loss; with trl installed TRL's two
    systems and the ratio lines, without it the line that says they were skipped."""
    trl = ("trl-precomputed", "trl-live-ref")
    systems = ("ours", *trl) if importlib.util.find_spec("trl") else ("ours",)
    rows = {m[1]: numbers(m[2]) for m in re.finditer(rf"^(ours|{'|'.join(trl)})((?:\s+{NUM})+)\s*$", out, re.M)}
    assert set(rows) == set(systems), out
    for system, (pairs_per_s, step_s, reference_s, peak_rss, loss) in rows.items():
        assert pairs_per_s > 0 and step_s > 0 and reference_s >= 0 and peak_rss > 0, (system, out)
        assert math.isfinite(loss) and loss > 0, (system, out)
    for system in trl:
        ratio = re.search(rf"ours / {system}: throughput x({NUM}), peak memory x({NUM})", out)
        if system in systems:
            assert ratio and float(ratio[1]) > 0 and float(ratio[2]) > 0, out
        else:
            assert ratio is None and f"trl is not installed: {', '.join(trl)} skipped" in out, out


def check_ablation(out: str):
    """The sweep's ratio (three commands cost more than one sweep) and the LoRA table's two rows, metered against
    the same base model."""
    sweep = re.search(rf"one sweep ({NUM}) s, three commands ({NUM}) s \((.+)\): ({NUM})x", out)
    assert sweep and float(sweep[4]) > 0, out  # a ratio of times: no test asserts a speed
    assert re.search(r"the same 8 pairs:", out), out
    rows = {}
    for name in ("every weight", "LoRA rank 16"):
        row = re.search(rf"^\| {name} \| ({NUM}) \| ({NUM}) \| ({NUM}) -> ({NUM}) \|$", out, re.M)
        assert row, out
        rows[name] = [float(x) for x in row.groups()]
        dpo_s, peak_gib, base_pmi, pmi = rows[name]
        assert dpo_s >= 0 and peak_gib > 0 and math.isfinite(pmi), out
    assert rows["every weight"][2] == rows["LoRA rank 16"][2], out  # one base model, one held-out draw


def check_profile_step(out: str):
    """Each layout's parts, its step time and floor line, and the ratio of the two layouts' steps."""
    for layout in ("packed rows", "two causal rows per pair"):
        part = out[out.index(f"-- {layout}"):]
        step = re.search(rf"^step\s+({NUM})$", part, re.M)
        assert step and float(step[1]) > 0, out
        assert re.search(rf"real tokens per step ({NUM}), padding share", part), out
    ratio = re.search(rf"two causal rows / packed: step ({NUM})x the time", out)
    assert ratio and float(ratio[1]) > 0, out


def check_pmi_page(out: str):
    """The page's size, render, write and parse times and element count, without and with the pairs section; the
    pairs make it larger."""
    sizes = {}
    for label in ("held-out items", "held-out items and pairs"):
        row = re.search(rf"^{label}: 20 items, .*: ({NUM}) MB, render ({NUM}) s, write ({NUM}) s, html.parser ({NUM}) "
                        rf"s, (\d+) elements$", out, re.M)
        assert row and float(row[1]) > 0 and int(row[5]) > 0 and all(float(x) >= 0 for x in row.groups()), out
        sizes[label] = float(row[1])
    assert sizes["held-out items and pairs"] > sizes["held-out items"], out


# One row per benchmark script: its file, the flags after --tiny and the check of its output (bench/gpu_check.py
# has tests/test_gpu_check.py).
BENCHMARKS = [
    ("bench/sampler.py", (), check_sampler),
    ("bench/train_step.py", (), check_train_step),
    ("bench/ablation.py", (), check_ablation),
    ("bench/profile_step.py", ("--layout", "both", "--steps", "2"), check_profile_step),
    ("bench/pmi_page.py", (), check_pmi_page),
]


@pytest.mark.parametrize("script, flags, check", BENCHMARKS, ids=[Path(script).stem for script, _, _ in BENCHMARKS])
def test_tiny_mode(script, flags, check):
    check(run_tiny(script, *flags))
