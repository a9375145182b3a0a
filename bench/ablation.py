"""What an ablation costs, side by side in one run, each command in a process of its own:

    python bench/ablation.py sweep --model llama      # three losses as one sweep against three separate commands
    python bench/ablation.py lora --model llama       # every weight trained against --lora-rank 16, same pairs

sweep: wall time of `train.py --loss sigmoid ipo hinge` against the three single commands (each samples its pairs
and scores its reference again), then the ratio. lora: the main command, then the same pairs trained by rank-16
adapters: DPO time, peak resident memory of each process (the DPO stage holds the peak), the held-out meter.
Every command is the CPU preset's, the model aside.
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
LOSSES = ("sigmoid", "ipo", "hinge")


def train(*flags) -> dict:
    """One train.py process: wall seconds and peak resident memory (GiB) of that process alone."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *flags], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"train.py {' '.join(flags)} failed:\n{proc.stderr.read()[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_gib": usage.ru_maxrss / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("sweep", "lora"))
    parser.add_argument("--model", default="llama", help="bundled model name or HF directory (default llama)")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary directory)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="mipo-ablation-"))
    common = ["--model", args.model]
    if args.what == "sweep":
        swept = train(*common, "--loss", *LOSSES, "--out", str(root / "sweep"))
        single = [train(*common, "--loss", loss, "--out", str(root / loss)) for loss in LOSSES]
        total = sum(s["seconds"] for s in single)
        parts = " + ".join(f"{s['seconds']:.0f}" for s in single)
        print(f"{args.model}, CPU preset, --loss {' '.join(LOSSES)}: one sweep {swept['seconds']:.0f} s, three "
              f"commands {total:.0f} s ({parts}): {total / swept['seconds']:.2f}x")
        return
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
    print(f"{args.model}, CPU preset, the same {n} pairs:")
    print("| trained | DPO s | peak RSS GiB | held-out pmi (base -> trained) |\n|---|---:|---:|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['dpo_s']:.0f} | {r['peak_gib']:.1f} | {r['base_pmi']:.2f} -> {r['pmi']:.2f} |")


if __name__ == "__main__":
    main()
