"""Our sampler against transformers' generate, side by side on the same model, dtype, prompts and settings.

    python bench/sampler.py                       # both bundled models, float32 and bfloat16
    python bench/sampler.py --models llama --dtypes float32 --new-tokens 32   # a quick look

Each (engine, model, dtype) runs in its own subprocess so peak memory is that engine's alone.
Tokens are counted the same way for both: each row's completion up to and including its stop token.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model_loader import ModelConfig, Tokenizer, load_model, read_json, resolve_model_dir  # noqa: E402
from sampler import generate, sample  # noqa: E402

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
    "A train leaves at 3pm travelling 60 km/h; another leaves the same station at 4pm at 90 km/h. When does the second catch up?",
]
CONTEXT = ("I am a high-school teacher preparing material for students who struggle with reading, so please use plain "
           "words, short sentences and a friendly tone, and avoid jargon unless you explain it. ")


def chat_prompts(n):
    """n chat prompts of mixed length: every other one carries a paragraph of user context."""
    return [[{"role": "user", "content": (CONTEXT if i % 2 else "") + QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


def run_one(engine, model_name, dtype_name, batch, new_tokens, top_p, seed):
    dtype = getattr(torch, dtype_name)
    model_dir = resolve_model_dir(model_name)
    tok = Tokenizer(model_dir, ModelConfig.from_dict(read_json(model_dir / "config.json")))
    prompts = [tok.apply_chat_template(m) for m in chat_prompts(batch)]
    stops = tok.stop_token_ids
    if engine == "transformers":  # only its own model in this process, so the peak memory is its own
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

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
        model, _ = load_model(model_name, dtype=dtype)

        def run(n_new):
            return generate(model, prompts, n_new, temperature=1.0, top_p=top_p, stop_token_ids=stops, seed=seed,
                            batch_size=batch, progress=False)

    run(4)  # warm-up: allocator, oneDNN kernels
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    completions = run(new_tokens)
    seconds = time.perf_counter() - start
    result = dict(engine=engine, model=model_name, dtype=dtype_name, seconds=seconds,
                  tokens=sum(len(c) for c in completions), peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  rss_growth_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
                  mean_len=sum(len(c) for c in completions) / len(completions))
    if engine == "ours":
        result.update(breakdown(model, prompts, new_tokens, top_p, seconds))
    return result


def breakdown(model, prompts, new_tokens, top_p, total):
    """Where our time goes: one prefill forward, the sampling arithmetic alone, and the decode forwards.
    Decode at batch B reads every weight once per step, so weights bytes / memory bandwidth is its floor."""
    device = model.lm_head.weight.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(ids, logits_index=-1).float()
        prefill = time.perf_counter() - start
        g = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for _ in range(8):
            sample(logits, 1.0, top_p, 0, g)
        sampling_per_step = (time.perf_counter() - start) / 8
        step_ids = ids[:, -1:]
        start = time.perf_counter()
        for _ in range(4):
            model(step_ids, logits_index=-1)
        forward_1tok = (time.perf_counter() - start) / 4
    big = torch.ones(64 * 2**20)  # 256 MB of float32, far larger than the caches: a sum reads it from memory
    big.sum()
    start = time.perf_counter()
    for _ in range(5):
        big.sum()
    bandwidth = 5 * big.numel() * 4 / (time.perf_counter() - start)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(prefill_s=prefill, sampling_ms_per_step=sampling_per_step * 1e3, decode_forward_ms=forward_1tok * 1e3,
                weights_mb=weight_bytes / 2**20, read_bandwidth_gbs=bandwidth / 1e9,
                bandwidth_floor_ms=weight_bytes / bandwidth * 1e3)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama", "qwen"], help="bundled model names or HF directories")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="weight dtypes to compare")
    p.add_argument("--batch", type=int, default=32, help="prompts per batch (all prompts in one batch)")
    p.add_argument("--new-tokens", type=int, default=128, help="max new tokens per prompt")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus threshold (temperature is 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--_one", nargs=3, metavar=("ENGINE", "MODEL", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        print(json.dumps(run_one(*args._one, args.batch, args.new_tokens, args.top_p, args.seed)))
        return
    rows = []
    for model_name in args.models:
        for dtype in args.dtypes:
            pair = {}
            for engine in ("transformers", "ours"):
                cmd = [sys.executable, __file__, "--_one", engine, model_name, dtype, "--batch", str(args.batch),
                       "--new-tokens", str(args.new_tokens), "--top-p", str(args.top_p), "--seed", str(args.seed)]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if out.returncode:
                    sys.exit(f"{engine} {model_name} {dtype} failed:\n{out.stderr[-2000:]}")
                pair[engine] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(pair)
            hf, ours = pair["transformers"], pair["ours"]
            print(f"{model_name:6s} {dtype:9s} transformers {hf['tokens'] / hf['seconds']:7.1f} tok/s "
                  f"({hf['peak_rss_mb']:6.0f} MB) | ours {ours['tokens'] / ours['seconds']:7.1f} tok/s "
                  f"({ours['peak_rss_mb']:6.0f} MB) | speed-up {ours['tokens'] / ours['seconds'] / (hf['tokens'] / hf['seconds']):.2f}x",
                  flush=True)
            print(f"         ours: prefill {ours['prefill_s']:.2f} s, decode forward {ours['decode_forward_ms']:.0f} ms/step "
                  f"(weights {ours['weights_mb']:.0f} MB at {ours['read_bandwidth_gbs']:.1f} GB/s: floor "
                  f"{ours['bandwidth_floor_ms']:.0f} ms), sampling {ours['sampling_ms_per_step']:.1f} ms/step", flush=True)
    print("\n| model | dtype | transformers tok/s | ours tok/s | speed-up | peak RSS MB (hf / ours) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for pair in rows:
        hf, ours = pair["transformers"], pair["ours"]
        a, b = hf["tokens"] / hf["seconds"], ours["tokens"] / ours["seconds"]
        print(f"| {ours['model']} | {ours['dtype']} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {hf['peak_rss_mb']:.0f} / {ours['peak_rss_mb']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
