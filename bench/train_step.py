"""Our DPO training step against TRL's DPOTrainer: same model, same pairs, same global batch, same dtype (bf16
autocast over float32 weights), same optimizer (fused AdamW, betas 0.9/0.95, clip 1.0, cosine to 0.1x).

    python bench/train_step.py --model llama --pairs runs/llama-persona-incomplete-sigmoid/pairs.jsonl
    python bench/train_step.py --model llama --pairs PAIRS --device cuda      # a GPU: peak GPU memory too
    python bench/train_step.py --tiny      # seconds: a tiny random model and pairs it samples, one short run

Three systems, each in a fresh process so that its peak resident memory is its own:
  ours             train.py's stage 2 (reference log-probs, one no-grad pass) then stage 3 (DPO steps)
  trl-precomputed  DPOTrainer(precompute_ref_log_probs=True): the same two phases
  trl-live-ref     DPOTrainer's default: a second, frozen copy of the model scores every batch during training
Training speed is pairs per second over the optimizer steps after the first (which pays for warm-up); the
reference pass is timed on its own. Peak memory is the process's maximum resident set size (ru_maxrss), and on a
GPU also torch.cuda.max_memory_allocated.
"""
import argparse
import importlib.util
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


def synchronize(device: str):
    """Wait for the GPU's queued work, so that a wall-clock time covers it (nothing on a CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_ours(args, pairs) -> dict:
    """train.py's stages 2 and 3 as its train_run calls them, on a Run built from train.py's own flags."""
    import torch

    import train
    from bookkeeping import config
    from bookkeeping.runs import Run
    from formats import pairs_file
    from model_loader import load_model
    from transforms import cpu_speedups

    with tempfile.TemporaryDirectory() as out:
        flags = ["--model", args.model, "--task", pairs[0]["task"], "--pairs", args.pairs, "--n", str(len(pairs)),
                 "--n-eval", "0", "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.batch_size),
                 "--lr", str(args.lr), "--dtype", args.dtype, "--device", args.device,
                 "--save-minutes", "0", "--out", out]  # no checkpoint
        flags += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        pairs_cfg, loss_cfg, opt, hw, run_dir = config.resolve_config(config.train_parser().parse_args(flags))
        run = Run(pairs_cfg, loss_cfg, opt, hw, run_dir)
        torch.manual_seed(opt.seed)  # as runs.start
        model, tokenizer = load_model(args.model, hw.device, torch.float32)
        cpu_speedups.apply(model)
        pairs_file.use_recorded_date(tokenizer, pairs, args.pairs)
        synchronize(hw.device)
        t = time.time()
        records = train.reference_logps(model, tokenizer, pairs, run)
        synchronize(hw.device)
        reference_s = time.time() - t
        train.train(model, tokenizer, records, run)
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the seconds of each step after the first, from the pairs/s train.py logs per step
    step_s = [args.batch_size / m["pairs/s"] for m in history[1:]]
    return {"reference_s": reference_s, "step_s": step_s, "final_loss": history[-1]["loss"]}


def run_trl(args, pairs, live_reference: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from model_loader import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                                 for p in pairs])
    step_s = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            synchronize(args.device)
            self.t = time.time()

        def on_step_end(self, *_, **__):
            synchronize(args.device)
            step_s.append(time.time() - self.t)

    with tempfile.TemporaryDirectory() as out:
        # bf16: the Trainer's autocast (accelerate's mixed precision) over the float32 weights, on a CPU or a GPU
        config = DPOConfig(
            output_dir=out, use_cpu=torch.device(args.device).type == "cpu", bf16=args.dtype == "bfloat16",
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=args.lr, adam_beta2=0.95,
            weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0.03, beta=0.1, loss_type=["sigmoid"],
            precompute_ref_log_probs=not live_reference, gradient_checkpointing=args.gradient_checkpointing,
            max_length=None, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, seed=0)
        t = time.time()
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[StepTimer()])
        synchronize(args.device)
        setup_s = time.time() - t  # tokenization, plus the reference pass when precomputed
        trainer.train()
        final_loss = [x["loss"] for x in trainer.state.log_history if "loss" in x][-1]
    return {"reference_s": setup_s, "step_s": step_s[1:], "final_loss": final_loss}


def run_one(args):
    import torch

    from formats.pairs_file import read_pairs

    pairs = read_pairs(args.pairs)[:args.n]
    if args.system == "ours":
        result = run_ours(args, pairs)
    else:
        result = run_trl(args, pairs, live_reference=args.system == "trl-live-ref")
    result.update(system=args.system, peak_rss_gib=peak_rss_gib(), pairs=len(pairs))
    if torch.device(args.device).type == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(result), flush=True)


def tiny_inputs(root: Path) -> tuple[str, str]:
    """A tiny random model and 8 pairs it sampled (mipo.py, the test settings of tests/test_train.py) under root."""
    from bench.tiny_model import write_prompts, write_tiny_model

    model = write_tiny_model(root / "tiny")
    prompts = write_prompts(root / "prompts.jsonl", 12)  # every fifth held out: 10 to train on
    pairs = root / "pairs.jsonl"
    cmd = [sys.executable, str(REPO / "mipo.py"), "--model", str(model), "--task", "jsonl", "--data", str(prompts),
           "--negative", "random-resample", "--n", "8", "--max-new-tokens", "6", "--temperature", "1.0",
           "--batch-size", "4", "--dtype", "float32", "--device", "cpu", "--out", str(pairs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"mipo.py failed:\n{proc.stderr[-3000:]}")
    return str(model), str(pairs)


def main():
    parser = argparse.ArgumentParser(description="DPO step: ours vs TRL's DPOTrainer, pairs/s and peak memory.")
    parser.add_argument("--model", default="llama",
                        help="bundled model name or HF directory (default llama: SmolLM2-135M)")
    parser.add_argument("--pairs", default=None, help="pairs file (mipo.py / train.py stage 1), sampled by --model")
    parser.add_argument("--n", type=int, default=32,
                        help="pairs to train on: n / batch-size optimizer steps (default 32)")
    parser.add_argument("--batch-size", type=int, default=4, help="global batch, one micro-batch (default 4)")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                        help="compute dtype (default bfloat16)")
    parser.add_argument("--device", default="cpu", help="torch device for every system: cpu or cuda (default cpu)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="on for both systems (TRL's own default is on)")
    parser.add_argument("--trl-malloc-like-ours", action="store_true",
                        help="give TRL's processes the glibc setting train.py makes (heap up to 64 MiB blocks, "
                             "trimmed past 8 MiB free), to separate it from the rest")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    parser.add_argument("--tiny", action="store_true", help="a quick check in seconds: a tiny random model, 8 pairs it "
                        "samples, 2 steps; TRL's systems are skipped where trl is not installed")
    parser.add_argument("--system", default=None, help=argparse.SUPPRESS)  # internal: run one system in this process
    args = parser.parse_args()
    if args.system:
        return run_one(args)
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    with tempfile.TemporaryDirectory(prefix="mipo-train-step-") as tmp:
        if args.tiny:
            args.model, args.pairs = tiny_inputs(Path(tmp))
            args.n, args.batch_size = 8, 4
            if importlib.util.find_spec("trl") is None:
                skipped = [s for s in systems if s.startswith("trl")]
                systems = [s for s in systems if not s.startswith("trl")]
                if skipped:
                    print(f"trl is not installed: {', '.join(skipped)} skipped", flush=True)
        elif args.pairs is None:
            parser.error("--pairs is required (or --tiny)")
        results = {system: run_system(args, system) for system in systems}
    print_results(args, results)


def run_system(args, system: str) -> dict:
    """One system in a process of its own: -> its RESULT line's numbers."""
    cmd = [sys.executable, __file__, "--system", system, "--model", args.model, "--pairs", args.pairs,
           "--n", str(args.n), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--dtype", args.dtype,
           "--device", args.device]
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    env = {**os.environ, "TQDM_DISABLE": "1"}
    # glibc reads them at start: cpu_speedups.keep_activations_in_the_heap
    if args.trl_malloc_like_ours and system != "ours":
        env.update(MALLOC_MMAP_THRESHOLD_=str(64 << 20), MALLOC_TRIM_THRESHOLD_=str(8 << 20))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{system} failed:\n{proc.stderr[-3000:]}")
    print(f"{system}: done", file=sys.stderr, flush=True)
    return json.loads(line[len("RESULT "):])


def print_results(args, results: dict):
    gpu = "peak_gpu_gib" in next(iter(results.values()))
    where = f"{args.device}" if gpu else f"{os.cpu_count()} CPU cores"
    print(f"\nDPO, {args.model}, {results[next(iter(results))]['pairs']} pairs, global batch {args.batch_size}, "
          f"{args.dtype} autocast, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {where}")
    print(f"{'system':<17}{'train pairs/s':>14}{'step s':>9}{'ref/setup s':>13}{'peak RSS GiB':>14}"
          + (f"{'peak GPU GiB':>14}" if gpu else "") + f"{'last loss':>11}")
    for system, r in results.items():
        step = statistics.median(r["step_s"])
        r["pairs_per_s"] = args.batch_size / step
        print(f"{system:<17}{r['pairs_per_s']:>14.3f}{step:>9.2f}{r['reference_s']:>13.1f}{r['peak_rss_gib']:>14.2f}"
              + (f"{r['peak_gpu_gib']:>14.2f}" if gpu else "") + f"{r['final_loss']:>11.4f}")
    memory = "peak_gpu_gib" if gpu else "peak_rss_gib"
    if "ours" in results:
        for system in results:
            if system != "ours":
                print(f"ours / {system}: throughput "
                      f"x{results['ours']['pairs_per_s'] / results[system]['pairs_per_s']:.2f}, "
                      f"peak {'GPU ' if gpu else ''}memory x{results['ours'][memory] / results[system][memory]:.2f}")


if __name__ == "__main__":
    main()
