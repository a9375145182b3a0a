"""Our sampler against transformers' generate, side by side on the same model, dtype, prompts and settings.

    python bench/sampler.py                       # both bundled models, float32 and bfloat16
    python bench/sampler.py --models llama --dtypes float32 --new-tokens 32   # a quick look
    python bench/sampler.py --device cuda --batch 64 --compile                 # a GPU: compiled decode, CUDA graphs
    python bench/sampler.py --tiny                # seconds: a tiny random model, 4 prompts, 8 new tokens

Each (engine, model, dtype) runs in its own subprocess so peak memory is that engine's alone.
Tokens are counted the same way for both: each row's completion up to and including its stop token.
On a CPU in float32 ours runs a second time with MIPO_ONEDNN=0 (MKL's sgemm, as transformers uses), which
separates what the sampler's own work gains from what oneDNN's float32 matrix products gain.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model_loader import ModelConfig, load_model, read_json, resolve_model_dir  # noqa: E402
from formats.tokenizer import Tokenizer  # noqa: E402
from sampler import generate, sample, uniforms  # noqa: E402
from transforms import cpu_speedups  # noqa: E402
from formats.dtypes import matmul_peak  # noqa: E402

QUESTIONS = [
    "What is the capital of Australia?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about autumn rain.",
    "Give me three tips for a job interview.",
    "How do vaccines train the immune system? Keep it short.",
    "Write a Python function that checks whether a number is prime.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "I have eggs, spinach and cheese. Suggest a quick dinner and list the steps.",
    "What causes inflation, and how do central banks respond to it?",
    "Describe the water cycle.",
    "Write a short, polite email declining a meeting invitation for Friday afternoon.",
    "What are the pros and cons of remote work for a small software team that is spread across three time zones?",
    ("A train leaves at 3pm travelling 60 km/h; another leaves the same station at 4pm at 90 km/h. When does the "
     "second catch up?"),
]
CONTEXT = ("I am a high-school teacher preparing material for students who struggle with reading, so please use plain "
           "words, short sentences and a friendly tone, and avoid jargon unless you explain it. ")


def chat_prompts(n):
    """n chat prompts of mixed length: every other one carries a paragraph of user context."""
    return [[{"role": "user", "content": (CONTEXT if i % 2 else "") + QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


def run_one(engine, model_name, dtype_name, batch, new_tokens, top_p, seed, device, compile, hf_malloc_like_ours):
    dtype = getattr(torch, dtype_name)
    model_dir = resolve_model_dir(model_name)
    tok = Tokenizer(model_dir, ModelConfig.from_dict(read_json(model_dir / "config.json")))
    prompts = [tok.apply_chat_template(m) for m in chat_prompts(batch)]
    stops = tok.stop_token_ids
    if engine == "transformers":  # only its own model in this process, so the peak memory is its own
        import transformers

        if hf_malloc_like_ours:
            cpu_speedups.keep_freed_memory_for_reuse()

        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

        def run(n_new):
            torch.manual_seed(seed)
            with torch.no_grad():
                out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                                  top_p=top_p, top_k=0, max_new_tokens=n_new, eos_token_id=stops,
                                  pad_token_id=tok.pad_token_id)
            completions = []
            for row in out[:, width:].tolist():
                cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
                completions.append(row[:cut])
            return completions
    else:
        model, _ = load_model(model_name, device=device, dtype=dtype)
        cpu_speedups.apply(model)  # as mipo.py, train.py and eval.py do

        def run(n_new):
            return generate(model, prompts, n_new, temperature=1.0, top_p=top_p, stop_token_ids=stops, seed=seed,
                            batch_size=batch, progress=False, compile=compile)

    run(new_tokens if compile else 4)  # warm-up: allocator, kernels; with --compile compilation and CUDA graphs
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    completions = run(new_tokens)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    # Peak memory: the process's resident set on a CPU (weights included), allocated GPU memory on a GPU.
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if cuda
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result = dict(engine=engine, model=model_name, dtype=dtype_name, device=device, seconds=seconds,
                  tokens=sum(len(c) for c in completions), peak_mb=peak_mb,
                  mean_len=sum(len(c) for c in completions) / len(completions))
    if engine == "ours":
        result.update(breakdown(model, run, prompts, completions, top_p, seconds))
    return result


def breakdown(model, run, prompts, completions, top_p, total):
    """Where our time goes: prefill (a run with one new token), the decode steps (the rest of the run over
    the longest completion's steps: forward, sampling and bookkeeping), and the sampling arithmetic alone on
    the full batch's first logits. A decode step reads every weight once, so weights bytes / memory bandwidth
    is one floor; at batch B its products' arithmetic, 2 x (the linear layers' weights) x B FLOPs, is another."""
    device = model.lm_head.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run(1)  # warm-up (with --compile, the graphs for this shape)
    sync()
    start = time.perf_counter()
    run(1)
    sync()
    prefill = time.perf_counter() - start
    steps = max(len(c) for c in completions) - 1
    with torch.no_grad():
        logits = torch.cat([model(torch.tensor([p], device=device), logits_index=-1).float() for p in prompts])
    nucleus = getattr(model, "top_k_top_p", None)  # the filter cpu_speedups.apply gave the model, as generate takes it
    rows = torch.arange(len(prompts), device=device)

    def one_step(step):  # as sampler.decode_step draws: a uniform per row from (seed, row, step), then the sample
        return sample(logits, temperature=1.0, top_p=top_p, top_k=0, u=uniforms(0, rows, step), top_k_top_p=nucleus)

    one_step(0)
    sync()
    start = time.perf_counter()
    for step in range(8):
        one_step(step)
    sync()
    sampling_per_step = (time.perf_counter() - start) / 8
    # Read bandwidth: a sum over a buffer far larger than the caches reads it from memory once.
    big = torch.ones((256 if device.type == "cuda" else 64) * 2**20, device=device)
    big.sum()
    sync()
    start = time.perf_counter()
    for _ in range(5):
        big.sum()
    sync()
    bandwidth = 5 * big.numel() * 4 / (time.perf_counter() - start)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # The matmul floor of a step at the full batch: the decoder's and the output projection's weight matrices
    # (the embedding is a lookup), 2 FLOPs per weight and row, at the peak of a 2048^3 product in this dtype.
    linear = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name)
    linear += model.lm_head.weight.numel() if model.config.tie_word_embeddings else 0
    peak = matmul_peak(model.lm_head.weight.dtype, device=device)
    return dict(prefill_s=prefill, decode_ms_per_step=(total - prefill) / max(steps, 1) * 1e3,
                matmul_peak_gflops=peak / 1e9, matmul_floor_ms=2 * linear * len(prompts) / peak * 1e3,
                sampling_ms_per_step=sampling_per_step * 1e3, weights_mb=weight_bytes / 2**20,
                read_bandwidth_gbs=bandwidth / 1e9, bandwidth_floor_ms=weight_bytes / bandwidth * 1e3)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama", "qwen"], help="bundled model names or HF directories")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="weight dtypes to compare")
    p.add_argument("--batch", type=int, default=32, help="prompts per batch (all prompts in one batch)")
    p.add_argument("--new-tokens", type=int, default=128, help="max new tokens per prompt")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus threshold (temperature is 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compile", action="store_true", help="ours: the decode step through torch.compile "
                   "(static shapes; CUDA graphs on a GPU)")
    p.add_argument("--hf-malloc-like-ours", action="store_true", help="give transformers the glibc settings our "
                   "sampler gets (cpu_speedups.keep_freed_memory_for_reuse)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--tiny", action="store_true", help="a quick check in seconds: a tiny random model (float32, "
                   "batch 4, 8 new tokens) in place of --models, --dtypes, --batch and --new-tokens")
    p.add_argument("--_one", nargs=3, metavar=("ENGINE", "MODEL", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        print(json.dumps(run_one(*args._one, args.batch, args.new_tokens, args.top_p, args.seed, args.device,
                                 args.compile, args.hf_malloc_like_ours)))
        return
    if args.tiny:
        from bench.tiny_model import write_tiny_model

        with tempfile.TemporaryDirectory(prefix="mipo-sampler-") as tmp:
            args.models, args.dtypes = [str(write_tiny_model(Path(tmp) / "tiny"))], ["float32"]
            args.batch, args.new_tokens = 4, 8
            return compare(args)
    compare(args)


def compare(args):
    """Every engine on every (model, dtype), each in a process of its own; a line per engine, then the table."""
    rows = []
    for model_name in args.models:
        for dtype in args.dtypes:
            row = {}
            engines = {"transformers": {}, "ours": {}}
            if args.device == "cpu" and dtype == "float32":
                engines["ours, MKL sgemm"] = {"MIPO_ONEDNN": "0"}
            for engine, env in engines.items():
                cmd = [sys.executable, __file__, "--_one", engine.split(",")[0], model_name, dtype, "--batch",
                       str(args.batch), "--new-tokens", str(args.new_tokens), "--top-p", str(args.top_p), "--seed",
                       str(args.seed), "--device", args.device, *(["--compile"] if args.compile else []),
                       *(["--hf-malloc-like-ours"] if args.hf_malloc_like_ours else [])]
                out = subprocess.run(cmd, capture_output=True, text=True,
                                     env={**os.environ, "PYTHONWARNINGS": "ignore", **env})
                if out.returncode:
                    sys.exit(f"{engine} {model_name} {dtype} failed:\n{out.stderr[-2000:]}")
                row[engine] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            hf_rate = row["transformers"]["tokens"] / row["transformers"]["seconds"]
            for engine, r in row.items():
                rate = r["tokens"] / r["seconds"]
                print(f"{model_name:6s} {dtype:9s} {engine:16s} {rate:7.1f} tok/s  {rate / hf_rate:5.2f}x  "
                      f"peak {r['peak_mb']:6.0f} MB", flush=True)
            ours = row["ours"]
            print(f"{'':17s}ours: prefill {ours['prefill_s']:.2f} s, decode {ours['decode_ms_per_step']:.0f} ms/step "
                  f"(weights {ours['weights_mb']:.0f} MB at {ours['read_bandwidth_gbs']:.1f} GB/s: floor "
                  f"{ours['bandwidth_floor_ms']:.1f} ms), of which sampling {ours['sampling_ms_per_step']:.1f} ms",
                  flush=True)
            print(f"{'':17s}ours: matmul floor of a step at batch {args.batch} {ours['matmul_floor_ms']:.1f} ms "
                  f"({ours['matmul_peak_gflops']:.0f} GFLOP/s, 2048^3 {dtype}): the average step is "
                  f"{ours['decode_ms_per_step'] / ours['matmul_floor_ms']:.1f}x it (rows leave as they stop)",
                  flush=True)
    memory = "peak GPU MB" if args.device != "cpu" else "peak RSS MB"
    print(f"\n| model | dtype | transformers tok/s | ours tok/s | speed-up | {memory} (hf / ours) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        hf, ours = row["transformers"], row["ours"]
        a, b = hf["tokens"] / hf["seconds"], ours["tokens"] / ours["seconds"]
        print(f"| {ours['model']} | {ours['dtype']} | {a:.1f} | {b:.1f} | {b / a:.2f}x | "
              f"{hf['peak_mb']:.0f} / {ours['peak_mb']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
