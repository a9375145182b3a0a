"""What to measure the day a GPU is lent, in one command of about 9 minutes on one 80 GB GPU:

    python bench/gpu_check.py                          # every section, on cuda
    python bench/gpu_check.py --sections a --out runs/gpu_check
    python bench/gpu_check.py --tiny                   # every section on the CPU with a tiny model, in about a minute
    python bench/gpu_check.py --tiny --device cuda     # the same on the GPU: a smoke test before the real run

  a  sampler: sampler.generate against transformers' generate (eager, and its static cache under torch.compile),
     ours eager and with compile=True; tokens/s and their ratio, bf16, batches 32 and 128
  b  DPO step: train.py's dpo_step on synthetic pairs against TRL's DPOTrainer (where TRL imports); pairs/s and
     model FLOPs utilization (6 x matmul weights x tokens per step / step time / a measured bf16 matmul peak)
  c  memory: torch.cuda.max_memory_allocated of DPO steps against shard.memory_plan for the same config and batch
  d  step 0: the real `python train.py` on CUDA with a tiny model; its step-0 check must print OK
  e  resume: that run killed after a checkpoint (--_crash-at) and run again, its final weights against an
     uninterrupted run's: bitwise equal, or the largest difference (reported, not asserted)

The lent machine reaches no model hub and receives only the repository, so every model has random weights at the
shapes of the bundled models (BUNDLED below) or of the paper's (transforms/shard.py PAPER_MODELS); prompts and pairs
are random token ids. Each section runs in a process of its own under a time limit, so a crash, an out-of-memory or
a hang in one prints a line and the others still run. The command ends with a Markdown table for
docs/performance.md ("On a GPU").
"""
import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.tiny_model import CONFIG as TINY_CONFIG, write_prompts, write_tiny_model  # noqa: E402
from model_loader import CausalLM, ModelConfig  # noqa: E402
from transforms import shard  # noqa: E402

# The bundled models' shapes, from the config.json their conversion writes (formats/gguf_convert.py).
BUNDLED = {
    # `qwen`: Qwen2.5-Coder-0.5B-Instruct (Qwen2.5-0.5B's shapes, but an untied lm_head).
    "qwen": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6,
                 max_position_embeddings=32768, tie_word_embeddings=False),
    # `llama`: HuggingFaceTB/SmolLM2-135M-Instruct.
    "llama": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e5,
                  max_position_embeddings=8192, tie_word_embeddings=True),
}
SECTIONS = {"a": "sampler", "b": "DPO step", "c": "memory", "d": "step 0", "e": "resume"}
# What each mode runs. Seconds: each section's limit (under 9 minutes in all on a GPU); a section skips what would
# not finish in its time and says so.
SETTINGS = {
    "gpu": dict(dtype="bfloat16", sampler_models=["qwen", "llama"], batches=[32, 128], new_tokens=128,
                prompt_lengths=(16, 128), step_models=["qwen", "qwen2.5-1.5b"], memory_models=["qwen", "llama-3.2-1b",
                "qwen2.5-1.5b", "qwen2.5-3b"], prompt_tokens=512, response_tokens=512, pairs=4, steps=3,
                matmul_n=8192, train_dtypes=["float32", "bfloat16"], compile_seconds=100,
                seconds={"a": 210, "b": 130, "c": 60, "d": 40, "e": 80}),
    "tiny": dict(dtype="float32", sampler_models=["tiny"], batches=[4], new_tokens=8, prompt_lengths=(3, 8),
                 step_models=["tiny"], memory_models=["tiny"], prompt_tokens=8, response_tokens=6, pairs=4, steps=2,
                 matmul_n=256, train_dtypes=["float32"], compile_seconds=0,
                 seconds={s: 150 for s in SECTIONS}),
}
TOP_P = 0.9
GIB = 2**30


# ---------------------------------------------------------------------------------------------------------------
# Shared by the sections: models from configs, timing, what a section prints and returns.
# ---------------------------------------------------------------------------------------------------------------


def model_config(name: str) -> ModelConfig:
    """A bundled model's shapes, a paper model's (shard.PAPER_MODELS), `tiny`, or a directory's config.json."""
    if name == "tiny":
        return ModelConfig.from_dict(TINY_CONFIG, "bench/tiny_model.py CONFIG")
    if name in BUNDLED:
        return ModelConfig.from_dict(BUNDLED[name], f"BUNDLED[{name!r}]")
    if name in shard.PAPER_MODELS:
        return shard.paper_config(name)
    return ModelConfig.from_dict(json.loads((Path(name) / "config.json").read_text()), name)


def random_model(name: str, device, dtype=torch.float32, seed=0) -> CausalLM:
    """Random weights, made on the device (fast for billions of parameters); lm_head (tied or not) scaled so that
    logits have a standard deviation of about 3: a next-token distribution far from uniform, as a trained model's."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = CausalLM(model_config(name))
    with torch.no_grad():
        weight = model.lm_head.weight
        weight.mul_(3 / (weight.std() * model.config.hidden_size ** 0.5))
    return model.to(dtype).eval()


def transformers_twin(model: CausalLM):
    """transformers' model of the same architecture holding the same weights (keys map 1:1)."""
    import transformers

    raw = model.config.to_dict()
    raw.pop("architectures", None)
    weight = model.lm_head.weight
    with torch.device(weight.device):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**raw))
    hf.to(weight.dtype).load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float:
    """Allocated GPU memory's peak; on a CPU the process's peak resident set (all of it, since it started)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def say(line: str):
    print(line, flush=True)


def emit(section: str, case: str, result: str, **numbers):
    """One result: a line now; a row of the final table and the JSON through the parent (the RESULT line)."""
    say(f"  {case}: {result}")
    print("RESULT " + json.dumps({"section": section, "case": case, "result": result, **numbers}), flush=True)


def guarded(section: str, case: str, fn):
    """fn() in a try: a failure becomes one FAILED result, and the section goes on."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001: any failure of one case is reported, not raised
        if isinstance(e, torch.cuda.OutOfMemoryError):
            free("cuda")
        message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        result = f"FAILED: {type(e).__name__}: {message}"
        emit(section, case, result, error=True, row=[SECTIONS[section], case, result])


def skip(section: str, case: str):
    emit(section, case, "skipped: the section's time is up", skipped=True,
         row=[SECTIONS[section], case, "skipped: the section's time limit"])


class Clock:
    """The section's time limit: whether `seconds` more still fit."""

    def __init__(self, until: float):
        self.until = until

    def fits(self, seconds: float) -> bool:
        return time.time() + seconds < self.until


# ---------------------------------------------------------------------------------------------------------------
# a. The sampler against transformers' generate.
# ---------------------------------------------------------------------------------------------------------------


def random_prompts(n, lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=gen).tolist()
    return [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in sizes]


def hf_generate(hf, prompts, new_tokens, static):
    """transformers' generate on left-padded token ids, no stop token: every row gets new_tokens. static: its static
    cache, which generate compiles itself (CompileConfig; on a CPU too), or an explicit torch.compile where the
    installed transformers has no CompileConfig. -> tokens generated."""
    import transformers

    device = hf.device
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    config = transformers.GenerationConfig(do_sample=True, temperature=1.0, top_p=TOP_P, top_k=0,
                                           max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    if static:
        config.cache_implementation = "static"
        if hasattr(transformers, "CompileConfig"):
            config.compile_config = transformers.CompileConfig()
            config.compile_config._compile_all_devices = True  # by default only on accelerators
        elif not getattr(hf, "compiled_by_gpu_check", False):
            hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
            hf.compiled_by_gpu_check = True
    torch.manual_seed(0)
    with torch.no_grad():
        out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return out[:, width:].numel()


def section_sampler(s, device, clock):
    import sampler
    from transforms import cpu_speedups

    dtype = getattr(torch, s["dtype"])
    n_new = s["new_tokens"]
    for name in s["sampler_models"]:
        if not clock.fits(30):
            skip("a", name)
            continue
        model = random_model(name, device, dtype)
        hf = transformers_twin(model)
        probe = torch.randint(0, model.config.vocab_size, (1, 32), device=device)
        with torch.no_grad():
            logits = model(probe).float()
            same = (hf(probe).logits.float() - logits).abs().max().item()
        say(f"  {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {s['dtype']}; "
            f"transformers' twin: max |logit difference| {same:.2e} (logits up to {logits.abs().max().item():.1f})")
        cpu_speedups.apply(model)  # as mipo.py and train.py do (nothing on a GPU)

        def ours(prompts, compile):
            return lambda k: sum(map(len, sampler.generate(model, prompts, k, temperature=1.0, top_p=TOP_P, top_k=0,
                                                           stop_token_ids=(), seed=0, batch_size=len(prompts),
                                                           progress=False, compile=compile)))

        def theirs(prompts, static):
            return lambda k: hf_generate(hf, prompts, k, static)

        engines = {"ours eager": (ours, False), "transformers eager": (theirs, False),
                   "ours compile=True": (ours, True), "transformers static cache + compile": (theirs, True)}
        rates = {}
        for compiled in (False, True):  # every eager number first: a compile may take the section's time
            for batch in s["batches"]:
                prompts = random_prompts(batch, s["prompt_lengths"], model.config.vocab_size)
                for engine, (make, flag) in engines.items():
                    if flag != compiled:
                        continue
                    case = f"{name} batch {batch} {engine}"
                    if not clock.fits(s["compile_seconds"] + 15 if compiled else 15):
                        skip("a", case)
                        continue

                    def measure():
                        run = make(prompts, flag)
                        run(n_new if compiled else 4)  # warm-up: kernels; compiled: the graphs and CUDA graphs
                        tokens, seconds = timed(lambda: run(n_new), device)
                        rates[batch, engine] = tokens / seconds
                        emit("a", case, f"{tokens / seconds:.1f} tokens/s ({tokens} tokens in {seconds:.2f} s)",
                             model=name, batch=batch, engine=engine, tokens=tokens, seconds=seconds,
                             tokens_per_s=tokens / seconds)
                    guarded("a", case, measure)
        for batch in s["batches"]:
            r = {engine: rates.get((batch, engine)) for engine in engines}
            mine, other = list(engines)[0::2], list(engines)[1::2]  # each side's eager and compiled engine
            parts = [f"{kind} {r[a] / r[b]:.2f}x" for kind, a, b in zip(("eager", "compiled"), mine, other)
                     if r[a] and r[b]]
            best_ours, best_theirs = max(r[e] or 0 for e in mine), max(r[e] or 0 for e in other)
            if best_ours and best_theirs:
                parts.append(f"best against best {best_ours / best_theirs:.2f}x")
                emit("a", f"{name} batch {batch}: ours / transformers", ", ".join(parts), ratios=r,
                     row=["sampler", f"`{name}` {s['dtype']}, batch {batch}, {n_new} new tokens",
                          f"ours {best_ours:.0f} tok/s, transformers {best_theirs:.0f} tok/s (best of each); "
                          + ", ".join(parts)])
        model = hf = None  # freed before the next model
        torch._dynamo.reset()
        free(device)


# ---------------------------------------------------------------------------------------------------------------
# b, c. train.py's DPO step on synthetic pairs: speed against TRL, and peak memory against the plan.
# ---------------------------------------------------------------------------------------------------------------


def synthetic_records(vocab, n, prompt_tokens, response_tokens, seed=0):
    """n pairs of random ids as train.tokenize_pair makes them: a prompt and two responses, each ending in an end
    of turn. Ids as word_tokenizer has them: words w0 ... w{vocab - 3}, then <|eos|> and <|pad|>."""
    gen = torch.Generator().manual_seed(seed)
    words, eos = vocab - 2, vocab - 2

    def ids(k):
        return torch.randint(0, words, (k,), generator=gen).tolist()

    return [{"id": f"p{i}", "prompt_ids": ids(prompt_tokens), "chosen_ids": ids(response_tokens - 1) + [eos],
             "rejected_ids": ids(response_tokens - 1) + [eos], "chosen_length": response_tokens,
             "rejected_length": response_tokens} for i in range(n)]


def matmul_weights(cfg: ModelConfig) -> int:
    """The parameters a token is multiplied by: the decoder layers and the output projection (the input
    embedding is a lookup; a tied one is counted once, as the projection)."""
    counts = shard.count_parameters(cfg)
    return cfg.num_hidden_layers * counts["layer"] + cfg.vocab_size * cfg.hidden_size


def our_steps(name, s, device, dtype_name, micro, checkpointing, steps, packed=None):
    """train.py's stage 2 and 3 on synthetic pairs: the reference pass, then 1 + steps dpo_steps (the first not
    timed), in train.collate's rows for the device or, with packed given, that layout (train.PACKED, set for the
    call). -> step seconds, tokens per step, the peak (GiB) over the whole, from the model's creation on."""
    import train

    kind = torch.device(device).type
    default = train.PACKED.get(kind, False)
    train.PACKED[kind] = default if packed is None else packed
    try:
        return train_steps(name, s, device, dtype_name, micro, checkpointing, steps)
    finally:
        train.PACKED[kind] = default


def train_steps(name, s, device, dtype_name, micro, checkpointing, steps):
    import train
    from bookkeeping.config import HardwareConfig, LossConfig, OptimConfig, PairsConfig
    from bookkeeping.runs import Run
    from transforms import cpu_speedups

    free(device)
    model = random_model(name, device)  # float32 weights, as train.py trains them
    cpu_speedups.apply(model)
    G = s["pairs"]
    records = synthetic_records(model.config.vocab_size, G * (steps + 1), s["prompt_tokens"], s["response_tokens"])
    with tempfile.TemporaryDirectory() as out:
        run = Run(PairsConfig(model=name), LossConfig(), OptimConfig(lr=1e-6, batch_size=G, micro_batch_size=micro),
                  HardwareConfig(device=device, dtype=dtype_name, gradient_checkpointing=checkpointing), Path(out))
        with torch.no_grad():  # stage 2: the reference log-probs, on the micro-batches training runs
            for k in range(0, len(records), micro):
                chunk = records[k:k + micro]
                chosen, rejected = train.forward_logps(model, train.collate(chunk, False, device), run.hw)
                for r, c, x in zip(chunk, chosen.tolist(), rejected.tolist()):
                    r.update(ref_chosen_logps=c, ref_rejected_logps=x)
        model.train()  # as train.train does
        model.gradient_checkpointing = checkpointing
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=run.optim.betas, eps=1e-8,
                                      fused=torch.device(device).type in ("cpu", "cuda"))
        cpu_speedups.for_dpo(model, 1, False)
        policy = run.wrap(model)
        seconds, tokens = [], 0
        for step in range(steps + 1):
            batch = records[step * G:(step + 1) * G]
            (_, _, tokens), t = timed(lambda: train.dpo_step(policy, optimizer, batch, 1e-6, step, run), device)
            seconds.append(t)
    peak = peak_gib(device)
    model = policy = optimizer = None  # noqa: F841: freed before the next run
    free(device)
    return seconds[1:], tokens, peak


def word_tokenizer(vocab):
    """A transformers tokenizer whose word w{i} is token i: TRL's text pairs tokenize to our ids."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    ids = {f"w{i}": i for i in range(vocab - 2)}
    ids.update({"<|eos|>": vocab - 2, "<|pad|>": vocab - 1})
    tok = Tokenizer(models.WordLevel(ids, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|eos|>", "<|pad|>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>")


def trl_steps(name, s, device, dtype_name, steps):
    """TRL's DPOTrainer on the same shapes: precomputed reference log-probs (as train.py), no gradient
    checkpointing, fused AdamW, one micro-batch of the global batch. -> step seconds (the first dropped), tokens per
    step, peak GiB."""
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    free(device)
    model = random_model(name, device)
    hf = transformers_twin(model).train()
    del model
    G, V = s["pairs"], hf.config.vocab_size
    records = synthetic_records(V, G * (steps + 1), s["prompt_tokens"], s["response_tokens"])
    words = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
    data = Dataset.from_list([{"prompt": words(r["prompt_ids"]), "chosen": " " + words(r["chosen_ids"][:-1]),
                               "rejected": " " + words(r["rejected_ids"][:-1])} for r in records])  # TRL adds eos
    seconds = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync(device)
            seconds.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, use_cpu=torch.device(device).type == "cpu", bf16=dtype_name == "bfloat16",
                           per_device_train_batch_size=G, gradient_accumulation_steps=1, num_train_epochs=1,
                           learning_rate=1e-6, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
                           lr_scheduler_type="constant", optim="adamw_torch_fused", beta=0.1, loss_type=["sigmoid"],
                           precompute_ref_log_probs=True, gradient_checkpointing=False, max_length=None,
                           logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
                           dataloader_num_workers=0, seed=0)
        trainer = DPOTrainer(model=hf, args=config, train_dataset=data, processing_class=word_tokenizer(V),
                             callbacks=[StepTimer()])
        trainer.remove_callback(transformers.PrinterCallback)  # its log lines (with disable_tqdm)
        trainer.train()
    peak = peak_gib(device)
    del trainer, hf
    free(device)
    tokens = G * (2 * s["prompt_tokens"] + 2 * s["response_tokens"])  # prompt + chosen, prompt + rejected
    return seconds[1:], tokens, peak


def section_dpo_step(s, device, clock):
    from formats.dtypes import matmul_peak

    dtype_name = s["dtype"]
    n = s["matmul_n"]
    peak = matmul_peak(getattr(torch, dtype_name), n=n, device=device)
    say(f"  {dtype_name} matmul peak ({n}^3, best of 10): {peak / 1e12:.1f} TFLOP/s")
    have_trl = importlib.util.find_spec("trl") is not None
    if not have_trl:
        say("  TRL is not installed: ours alone")
    G, P, R = s["pairs"], s["prompt_tokens"], s["response_tokens"]
    for name in s["step_models"]:
        cfg = model_config(name)
        N = matmul_weights(cfg)
        compute = "bf16 autocast over float32 weights" if dtype_name == "bfloat16" else dtype_name
        shape = f"`{name}`, {G} pairs of {P} + 2 x {R} tokens, {compute}"
        found = {}
        other = "packed rows" if torch.device(device).type == "cuda" else "two causal rows"  # not the default
        for system in ("ours", f"ours, {other}", "TRL") if have_trl else ("ours", f"ours, {other}"):
            case = f"{name} {system}"
            if not clock.fits(40 if system == "TRL" else 20):
                skip("b", case)
                continue

            def measure():
                if system.startswith("ours"):
                    packed = None if system == "ours" else other == "packed rows"
                    seconds, tokens, mem = our_steps(name, s, device, dtype_name, G, False, s["steps"], packed)
                else:
                    seconds, tokens, mem = trl_steps(name, s, device, dtype_name, s["steps"])
                step = statistics.median(seconds)
                mfu = 6 * N * tokens / step / peak
                found[system] = (G / step, mfu, mem)
                emit("b", case, f"{G / step:.3f} pairs/s, step {step:.3f} s, {tokens} tokens/step, MFU {mfu:.1%}, "
                     f"peak {mem:.2f} GiB", model=name, system=system, pairs_per_s=G / step, step_s=step,
                     tokens=tokens, mfu=mfu, peak_gib=mem, matmul_weights=N, matmul_peak_flops=peak)
            guarded("b", case, measure)
        if found:
            row = "; ".join(f"{who} {v[0]:.2f} pairs/s, MFU {v[1]:.0%}" for who, v in found.items())
            row += f"; {other} / default layout {found[f'ours, {other}'][0] / found['ours'][0]:.2f}x" \
                if {"ours", f"ours, {other}"} <= found.keys() else ""
            if {"ours", "TRL"} <= found.keys():
                row += f"; ours / TRL {found['ours'][0] / found['TRL'][0]:.2f}x"
            print("RESULT " + json.dumps({"section": "b", "row": ["DPO step", shape, row]}), flush=True)


def section_memory(s, device, clock):
    dtype_name = s["dtype"]
    cuda = torch.device(device).type == "cuda"
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else 80 * GIB
    P, R, G = s["prompt_tokens"], s["response_tokens"], s["pairs"]
    if not cuda:
        say("  on a CPU the peak is the process's resident set since it started, not comparable with the plan")
    configs = []
    for i, name in enumerate(s["memory_models"]):
        cfg = model_config(name)
        try:  # what --preset paper would pick on this GPU
            layout = shard.choose_layout(cfg, 1, "single", gpu_bytes, G, prompt_tokens=P, response_tokens=R,
                                         param_bytes=2 if dtype_name == "bfloat16" else 4)
            configs.append((name, cfg, layout["micro_batch_pairs"], layout["gradient_checkpointing"]))
            if i == 0:  # the first model with checkpointing switched the other way too
                configs.append((name, cfg, layout["micro_batch_pairs"], not layout["gradient_checkpointing"]))
        except Exception as e:  # noqa: BLE001
            why = f"skipped: {str(e).splitlines()[0]}"
            emit("c", name, why, row=["memory", f"`{name}`", why])
    for name, cfg, micro, checkpointing in configs:
        ckpt = "with" if checkpointing else "without"
        case = f"{name} micro-batch {micro}, {ckpt} gradient checkpointing"
        if not clock.fits(20):
            skip("c", case)
            continue
        plan = shard.memory_plan(cfg, 1, "single", checkpointing, micro, prompt_tokens=P, response_tokens=R,
                                 param_bytes=2 if dtype_name == "bfloat16" else 4)
        say("    " + shard.format_memory_plan(plan, gpu_bytes if cuda else None).replace("\n", "\n    "))

        def measure():
            _, _, mem = our_steps(name, s, device, dtype_name, micro, checkpointing, 1)
            planned = plan["total"] / GIB
            emit("c", case, f"peak {mem:.3g} GiB, plan {planned:.3g} GiB, peak / plan {mem / planned:.2f}"
                 + ("" if cuda else " (CPU: the resident set)"),
                 model=name, micro_batch=micro, gradient_checkpointing=checkpointing, peak_gib=mem,
                 plan_gib=planned, plan={k: v for k, v in plan.items() if k != "meta"},
                 row=["memory", f"`{name}`, micro-batch {micro} of {P} + 2 x {R} tokens, {ckpt} checkpointing",
                      f"peak {mem:.3g} GiB, plan {planned:.3g} GiB: {mem / planned:.2f}x"
                      + ("" if cuda else " (CPU: the resident set)")])
        guarded("c", case, measure)


# ---------------------------------------------------------------------------------------------------------------
# d, e. The real train.py on the device with a tiny model: the step-0 check, and kill-and-resume.
# ---------------------------------------------------------------------------------------------------------------


def tiny_run_args(root: Path, out: Path, device, dtype_name, *extra):
    """tests/test_train.py's args_for, on the device: 8 pairs of at most 6 new tokens, batch 4."""
    if not (root / "tiny").exists():
        write_tiny_model(root / "tiny")
        write_prompts(root / "prompts.jsonl", 16)
    return ["--model", str(root / "tiny"), "--task", "jsonl", "--data", str(root / "prompts.jsonl"), "--negative",
            "random-resample", "--n", "8", "--n-eval", "0", "--max-new-tokens", "6", "--temperature", "1.0", "--lr",
            "1e-3", "--batch-size", "4", "--sample-batch-size", "2", "--dtype", dtype_name, "--device", device,
            "--out", str(out), *extra]


def train_cli(args, what="train.py", expect=0):
    """`python train.py ARGS`; an exit status other than `expect` raises with its last line of stderr."""
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    if done.returncode != expect:
        last = (done.stderr.strip() or "no message").splitlines()[-1]
        raise RuntimeError(f"{what}: exit status {done.returncode}, not {expect}: {last}")
    return done


def section_step0(s, device, clock):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for dtype_name in s["train_dtypes"]:
            case = f"train.py tiny model, {dtype_name}"
            if not clock.fits(15):
                skip("d", case)
                continue

            def check():
                done = train_cli(tiny_run_args(root, root / dtype_name, device, dtype_name))
                line = next((x for x in done.stdout.splitlines() if x.startswith("step-0 check")), None)
                if line is None:
                    raise RuntimeError("train.py printed no step-0 check")
                diff = float(re.search(r"= (\S+) nats", line).group(1))
                ok = line.endswith(": OK")
                emit("d", case, f"{'OK' if ok else 'MISMATCH'}, max |log pi - log pi_ref| {diff:.2e} nats", ok=ok,
                     max_abs_logp_diff=diff, line=line,
                     row=["step 0", f"`python train.py` on {device}, tiny model, {dtype_name}",
                          f"{'OK' if ok else 'MISMATCH'}, {diff:.1e} nats"])
            guarded("d", case, check)


def section_resume(s, device, clock):
    from safetensors.torch import load_file

    resume = ["--epochs", "2", "--save-every", "2", "--micro-batch-size", "2"]  # test_train.RESUME_ARGS
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for dtype_name in s["train_dtypes"]:
            case = f"train.py tiny model, {dtype_name}, SIGKILL after step 3, resumed"
            if not clock.fits(30):
                skip("e", case)
                continue

            def check():
                whole, cut = root / f"whole-{dtype_name}", root / f"cut-{dtype_name}"
                train_cli(tiny_run_args(root, whole, device, dtype_name, *resume), "the uninterrupted run")
                train_cli(tiny_run_args(root, cut, device, dtype_name, *resume, "--_crash-at", "train:3"),
                          "the run killed after step 3", expect=-9)
                again = train_cli(tiny_run_args(root, cut, device, dtype_name, *resume), "the resumed run")
                resumed = re.search(r"(\d+) optimizer step\(s\) done", again.stdout)
                a, b = (load_file(d / "final" / "model.safetensors") for d in (cut, whole))
                bitwise = all(torch.equal(a[k], b[k]) for k in b)
                diff = max((a[k].float() - b[k].float()).abs().max().item() for k in b)
                same = {f: (cut / f).read_bytes() == (whole / f).read_bytes()
                        for f in ("pairs.jsonl", "reference.jsonl")}
                result = ("final weights bitwise equal" if bitwise else f"final weights differ: max |diff| {diff:.2e}")
                result += (f"; resumed after step {resumed.group(1)}" if resumed else "; NOT resumed from a checkpoint")
                result += "".join(f"; {f} {'same' if v else 'differs'}" for f, v in same.items())
                emit("e", case, result, bitwise=bitwise, max_abs_diff=diff, resumed_at=int(resumed.group(1))
                     if resumed else None, same_files=same,
                     row=["resume", f"`python train.py` on {device}, tiny model, {dtype_name}, killed after step 3",
                          result.removeprefix("final weights ")])
            guarded("e", case, check)


RUNNERS = {"a": section_sampler, "b": section_dpo_step, "c": section_memory, "d": section_step0, "e": section_resume}


# ---------------------------------------------------------------------------------------------------------------
# The parent: each section in a process of its own, then the table.
# ---------------------------------------------------------------------------------------------------------------


def run_section(section: str, argv: list[str], seconds: float) -> tuple[list[dict], str | None]:
    """The section in a child process, its lines shown as they come. -> (its results, an error line or None).
    The child and what it started (train.py runs) are one process group, killed together at the time limit."""
    until = time.time() + seconds
    cmd = [sys.executable, __file__, *argv, "--_section", section, "--_until", str(until)]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO, start_new_session=True,
                                env={**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"})

        def kill():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(seconds + 20, kill)  # the child starts no work after `until`
        timer.start()
        results = []
        try:
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    results.append(json.loads(line[len("RESULT "):]))
                else:
                    print(line, end="", flush=True)
            proc.wait()
        finally:  # on Ctrl-C too: the child runs in a process group of its own, which the terminal's signal misses
            timer.cancel()
            if proc.poll() is None:
                kill()
        err.seek(0)
        tail = [x for x in err.read().strip().splitlines() if x.strip()]
    if proc.returncode == 0:
        return results, None
    why = "killed at its time limit" if proc.returncode == -9 else f"exit status {proc.returncode}"
    return results, f"{why}: {tail[-1] if tail else 'no message'}"


def environment(device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    for package in ("transformers", "trl"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if torch.device(device).type == "cuda":
        info["device"] = torch.cuda.get_device_name(0)
        info["gpu_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
    else:
        info["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return info


def write_json(out_dir, env, results) -> Path:
    path = Path(out_dir) / "gpu_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="torch device (default cuda; cpu with --tiny)")
    p.add_argument("--tiny", action="store_true", help="every section on the CPU with a tiny model, in seconds")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                   help="which sections (default all): " + ", ".join(f"{k} {v}" for k, v in SECTIONS.items()))
    p.add_argument("--out", default=None, help="also write the results as gpu_check.json in this directory")
    p.add_argument("--_section", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_until", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    s = SETTINGS["tiny" if args.tiny else "gpu"]
    device = args.device or ("cpu" if args.tiny else "cuda")
    if args._section:  # a child: one section
        RUNNERS[args._section](s, device, Clock(args._until))
        return
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {device}: no CUDA device here (--tiny runs every section on the CPU)")
    env = environment(device)
    say("gpu_check: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    argv = sys.argv[1:]
    results, failed = [], False
    for section in args.sections:
        say(f"\n## {section}. {SECTIONS[section]}")
        start = time.time()
        found, error = run_section(section, argv, s["seconds"][section])
        results += found
        if error:
            failed = True
            results.append({"section": section, "error": error,
                            "row": [SECTIONS[section], "(the whole section)", f"FAILED: {error}"]})
            say(f"  section {section} FAILED: {error}")
        failed |= any(r.get("error") for r in found)
        say(f"  ({time.time() - start:.0f} s)")
        if args.out:  # after each section: what was measured survives a kill of this command
            write_json(args.out, env, results)
    rows = [r["row"] for r in results if "row" in r]
    table = ["| check | case | result |", "| --- | --- | --- |", *(f"| {' | '.join(row)} |" for row in rows)]
    say(f"\n{env['device']}, torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}, "
        f"{env['date']}:\n\n" + "\n".join(table))
    if args.out:
        say(f"\nwritten: {write_json(args.out, env, results)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
