"""What an ablation costs, side by side in one run, each command in a process of its own:

    python bench/ablation.py sweep --model llama      # three losses as one sweep against three separate commands
    python bench/ablation.py lora --model llama       # every weight trained against --lora-rank 16, same pairs
    python bench/ablation.py --tiny                   # both, in seconds, on a tiny random model

sweep: wall time of `train.py --loss sigmoid ipo hinge` against the three single commands (each samples its pairs
and scores its reference again), then the ratio. lora: the main command, then the same pairs trained by rank-16
adapters: DPO time, peak resident memory of each process (the DPO stage holds the peak), the held-out meter.
Every command is the CPU preset's, the model aside; with --tiny, the settings tests/test_train.py runs the tiny
model with.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
LOSSES = ("sigmoid", "ipo", "hinge")
# tests/test_train.py's settings for the tiny model (4 held-out prompts, for the meter the lora table reports)
TINY_FLAGS = ["--task", "jsonl", "--negative", "random-resample", "--n", "8", "--n-eval", "4", "--max-new-tokens", "6",
              "--temperature", "1.0", "--lr", "1e-3", "--batch-size", "4", "--sample-batch-size", "2",
              "--dtype", "float32", "--device", "cpu"]


def train(*flags) -> dict:
    """One train.py process: wall seconds and peak resident memory (GiB) of that process alone."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *flags], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    stderr = proc.stderr.read()  # read while it runs: a full pipe would stop the process
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"train.py {' '.join(flags)} failed:\n{stderr[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_gib": usage.ru_maxrss / 2**20}


def sweep(common: list[str], root: Path, label: str):
    """One sweep over LOSSES against one command per loss: wall times and their ratio."""
    swept = train(*common, "--loss", *LOSSES, "--out", str(root / "sweep"))
    single = [train(*common, "--loss", loss, "--out", str(root / loss)) for loss in LOSSES]
    total = sum(s["seconds"] for s in single)
    parts = " + ".join(f"{s['seconds']:.0f}" for s in single)
    print(f"{label}, --loss {' '.join(LOSSES)}: one sweep {swept['seconds']:.0f} s, three "
          f"commands {total:.0f} s ({parts}): {total / swept['seconds']:.2f}x", flush=True)


def lora(common: list[str], root: Path, label: str):
    """Every weight trained, then rank-16 adapters on the same pairs: DPO time, peak memory, held-out meter."""
    rows = {}
    for name, extra in (("every weight", []), ("LoRA rank 16", ["--lora-rank", "16"])):
        out = root / name.replace(" ", "-")
        # The LoRA run trains on the first run's pairs; its reference pass and held-out pairs are its own.
        pairs = [] if not rows else ["--pairs", str(root / "every-weight" / "pairs.jsonl")]
        usage = train(*common, *pairs, *extra, "--out", str(out))
        summary = json.loads((out / "summary.json").read_text())
        rows[name] = {**usage, "dpo_s": summary["timings_s"]["train"], "pmi": summary["trained_eval"]["pmi"],
                      "base_pmi": summary["base_eval"]["pmi"]}
    n = sum(1 for _ in open(root / "every-weight" / "pairs.jsonl"))
    print(f"{label}, the same {n} pairs:")
    print("| trained | DPO s | peak RSS GiB | held-out pmi (base -> trained) |\n|---|---:|---:|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['dpo_s']:.1f} | {r['peak_gib']:.1f} | {r['base_pmi']:.2f} -> {r['pmi']:.2f} |",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=("sweep", "lora"), default=None, help="default: both")
    parser.add_argument("--model", default="llama", help="bundled model name or HF directory (default llama)")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--tiny", action="store_true", help="a quick check in seconds: a tiny random model and the "
                        "tests' settings (8 pairs, 6 new tokens) in place of --model and the CPU preset")
    args = parser.parse_args()
    if args.tiny and not args.out:  # nothing left behind
        with tempfile.TemporaryDirectory(prefix="mipo-ablation-") as tmp:
            return run(args, Path(tmp))
    run(args, Path(args.out or tempfile.mkdtemp(prefix="mipo-ablation-")))


def run(args, root: Path):
    common, label = ["--model", args.model], f"{args.model}, CPU preset"
    if args.tiny:
        from bench.tiny_model import write_prompts, write_tiny_model

        root.mkdir(parents=True, exist_ok=True)
        model, data = write_tiny_model(root / "tiny"), write_prompts(root / "prompts.jsonl", 20)
        common, label = ["--model", str(model), "--data", str(data), *TINY_FLAGS], "tiny model, test settings"
    for what, measure in (("sweep", sweep), ("lora", lora)):
        if args.what in (None, what):
            measure(common, root / what, label)


if __name__ == "__main__":
    main()
