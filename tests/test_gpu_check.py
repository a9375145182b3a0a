"""bench/gpu_check.py --tiny: every section of the GPU check runs on the CPU with a tiny model and prints its numbers,
so that the script still runs the day a GPU is lent."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NUMBER = r"([0-9.]+(?:e[-+]?\d+)?)"


def test_every_section_runs_in_tiny_mode_and_prints_its_numbers(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "FAILED" not in out and "skipped" not in out, out

    # a: four engines' tokens/s, and their ratios
    rates = dict(re.findall(rf"tiny batch 4 ([^:]+): {NUMBER} tokens/s", out))
    assert set(rates) == {"ours eager", "transformers eager", "ours compile=True",
                          "transformers static cache + compile"}, out
    assert all(float(r) > 0 for r in rates.values())
    assert re.search(r"ours / transformers: eager [0-9.]+x, compiled [0-9.]+x, best against best [0-9.]+x", out)
    assert "transformers' twin: max |logit difference| 0.00e+00" in out  # the same weights in both

    # b: pairs/s and MFU of ours, and of TRL where installed
    steps = {who: (float(rate), float(mfu)) for who, rate, mfu in
             re.findall(rf"tiny (ours|TRL): {NUMBER} pairs/s, .*MFU {NUMBER}%", out)}
    assert set(steps) == ({"ours", "TRL"} if importlib.util.find_spec("trl") else {"ours"}), out
    assert all(rate > 0 and mfu > 0 for rate, mfu in steps.values())

    # c: a peak and a plan, without and with gradient checkpointing
    memory = re.findall(rf"gradient checkpointing: peak {NUMBER} GiB, plan {NUMBER} GiB", out)
    assert len(memory) == 2 and all(float(p) > 0 and float(q) > 0 for p, q in memory), out

    # d: train.py's step-0 check passes
    step0 = re.search(rf"train.py tiny model, float32: OK, max \|log pi - log pi_ref\| {NUMBER} nats", out)
    assert step0 and float(step0.group(1)) <= 1e-3, out

    # e: killed after step 3, resumed from step 2's checkpoint, the weights compared
    assert re.search(r"SIGKILL after step 3, resumed: final weights (bitwise equal|differ: max \|diff\| \S+); "
                     r"resumed after step 2", out), out

    # the table for docs/performance.md, and the JSON
    table = out[out.index("| check | case | result |"):]
    assert [row.split(" | ")[0] for row in table.splitlines()[2:] if row.startswith("|")] == \
        ["| sampler", "| DPO step", "| memory", "| memory", "| step 0", "| resume"]
    results = json.loads((tmp_path / "gpu_check.json").read_text())["results"]
    assert {r["section"] for r in results} == {"a", "b", "c", "d", "e"}
    assert not any(r.get("error") for r in results)
