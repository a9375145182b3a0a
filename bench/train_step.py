"""Our DPO training step against TRL's DPOTrainer: same model, same pairs, same global batch, same dtype (bf16
autocast over float32 weights), same optimizer (fused AdamW, betas 0.9/0.95, clip 1.0, cosine to 0.1x).

    python bench/train_step.py --model llama --pairs runs/llama-persona-incomplete-sigmoid/pairs.jsonl

Three systems, each in a fresh process so that its peak resident memory is its own:
  ours             train.py's stage 2 (reference log-probs, one no-grad pass) then stage 3 (DPO steps)
  trl-precomputed  DPOTrainer(precompute_ref_log_probs=True): the same two phases
  trl-live-ref     DPOTrainer's default: a second, frozen copy of the model scores every batch during training
Training speed is pairs per second over the optimizer steps after the first (which pays for warm-up); the
reference pass is timed on its own. Peak memory is the process's maximum resident set size (ru_maxrss).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SYSTEMS = ("ours", "trl-precomputed", "trl-live-ref")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run_ours(args, pairs) -> dict:
    import torch

    from bookkeeping import config
    import train
    from model_loader import load_model

    model, tokenizer = load_model(args.model, "cpu", torch.float32)
    loss = config.LossConfig(loss="sigmoid", beta=0.1)
    opt = config.OptimConfig(lr=args.lr, batch_size=args.batch_size, micro_batch_size=args.batch_size)
    hw = config.HardwareConfig(device="cpu", dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
                              save_minutes=0)  # no checkpoint
    with tempfile.TemporaryDirectory() as out:
        t = time.time()
        records = train.reference_logps(model, tokenizer, pairs, loss, opt, hw, Path(out), 0, 1)
        reference_s = time.time() - t
        train.train(model, records, loss, opt, hw, Path(out), 0, 1)
        history = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    # pairs/s of each step after the first, from the per-step metrics train.py logs
    step_s = [args.batch_size / m["pairs/s"] for m in history[1:]]
    return {"reference_s": reference_s, "step_s": step_s, "final_loss": history[-1]["loss"]}


def run_trl(args, pairs, live_reference: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from model_loader import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                                 for p in pairs])
    step_s = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t = time.time()

        def on_step_end(self, *_, **__):
            step_s.append(time.time() - self.t)

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, use_cpu=True, bf16=args.dtype == "bfloat16", per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=args.lr, adam_beta2=0.95,
            weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0.03, beta=0.1, loss_type=["sigmoid"],
            precompute_ref_log_probs=not live_reference, gradient_checkpointing=args.gradient_checkpointing,
            max_length=None, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, seed=0)
        t = time.time()
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[StepTimer()])
        setup_s = time.time() - t  # tokenization, plus the reference pass when precomputed
        trainer.train()
        final_loss = [x["loss"] for x in trainer.state.log_history if "loss" in x][-1]
    return {"reference_s": setup_s, "step_s": step_s[1:], "final_loss": final_loss}


def run_one(args):
    from formats.pairs_file import read_pairs

    pairs = read_pairs(args.pairs)[:args.n]
    if args.system == "ours":
        result = run_ours(args, pairs)
    else:
        result = run_trl(args, pairs, live_reference=args.system == "trl-live-ref")
    result.update(system=args.system, peak_rss_gib=peak_rss_gib(), pairs=len(pairs))
    print("RESULT " + json.dumps(result), flush=True)


def main():
    parser = argparse.ArgumentParser(description="DPO step: ours vs TRL's DPOTrainer, pairs/s and peak memory.")
    parser.add_argument("--model", default="llama",
                        help="bundled model name or HF directory (default llama: SmolLM2-135M)")
    parser.add_argument("--pairs", required=True, help="pairs file (mipo.py / train.py stage 1), sampled by --model")
    parser.add_argument("--n", type=int, default=32,
                        help="pairs to train on: n / batch-size optimizer steps (default 32)")
    parser.add_argument("--batch-size", type=int, default=4, help="global batch, one micro-batch (default 4)")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                        help="compute dtype (default bfloat16)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="on for both systems (TRL's own default is on)")
    parser.add_argument("--trl-malloc-like-ours", action="store_true",
                        help="give TRL's processes the glibc setting train.py makes (heap up to 64 MiB blocks, "
                             "trimmed past 8 MiB free), to separate it from the rest")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    parser.add_argument("--system", default=None, help=argparse.SUPPRESS)  # internal: run one system in this process
    args = parser.parse_args()
    if args.system:
        return run_one(args)

    results = {}
    for system in args.systems.split(","):
        cmd = [sys.executable, __file__, "--system", system, "--model", args.model, "--pairs", args.pairs,
               "--n", str(args.n), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--dtype", args.dtype]
        cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        env = {**os.environ, "TQDM_DISABLE": "1"}
        # glibc reads them at start: cpu_speedups.keep_activations_in_the_heap
        if args.trl_malloc_like_ours and system != "ours":
            env.update(MALLOC_MMAP_THRESHOLD_=str(64 << 20), MALLOC_TRIM_THRESHOLD_=str(8 << 20))
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{system} failed:\n{proc.stderr[-3000:]}")
        results[system] = json.loads(line[len("RESULT "):])
        print(f"{system}: done", file=sys.stderr, flush=True)

    print(f"\nDPO, {args.model}, {results[next(iter(results))]['pairs']} pairs, global batch {args.batch_size}, "
          f"{args.dtype} autocast, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'system':<17}{'train pairs/s':>14}{'step s':>9}{'ref/setup s':>13}{'peak RSS GiB':>14}{'last loss':>11}")
    for system, r in results.items():
        step = statistics.median(r["step_s"])
        r["pairs_per_s"] = args.batch_size / step
        print(f"{system:<17}{r['pairs_per_s']:>14.3f}{step:>9.2f}{r['reference_s']:>13.1f}"
              f"{r['peak_rss_gib']:>14.2f}{r['final_loss']:>11.4f}")
    if "ours" in results:
        for system in results:
            if system != "ours":
                print(f"ours / {system}: throughput "
                      f"x{results['ours']['pairs_per_s'] / results[system]['pairs_per_s']:.2f}, "
                      f"peak memory x{results['ours']['peak_rss_gib'] / results[system]['peak_rss_gib']:.2f}")


if __name__ == "__main__":
    main()
