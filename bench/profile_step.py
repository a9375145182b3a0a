"""Where one DPO step of train.py spends its time, and how far it is from the matrix-product floor of the same
machine, measured in the same run.

    python bench/profile_step.py --model qwen --pairs runs/qwen-persona-incomplete-sigmoid/pairs.jsonl
    python bench/profile_step.py --model qwen --pairs ... --layout both   # packed rows against two causal rows
    python bench/profile_step.py --tiny                                    # a tiny random model, seconds (tests)

The step is train.py's own (collate -> forward_logps -> preference_loss -> backward -> clip -> fused AdamW), timed in
parts: the decoder body forward, the output projection + float32 log-softmax forward (from the first position
that predicts a response token on), their two backwards (split where the gradient reaches the output
projection's input), the optimizer, and a checkpoint write of weights + AdamW (runs.save_checkpoint).

The floor: the step's FLOPs at the measured peak of a square matrix product (2048^3) in the step's compute dtype.
FLOPs = 6 x N x real tokens for the decoder's linear layers (forward 2, backward 4 per parameter and token;
+2 when gradient checkpointing recomputes the forward), plus 6 x V x H per position the output projection runs
on; attention scores and the embedding lookup are left out (a few percent at these lengths). The fraction of
the floor is floor / measured step. Padding share: padded positions / all positions of the forward.
The reference log-probs are set to 0: the loss values differ from a real run, the computation does not.

--layout: train.collate's rows, packed ([x, y+, x[-1], y-] under an attention mask) or two causal rows per pair
([x, y+] and [x, y-], no mask: a GPU's flash kernel); both: the two alternate, step by step, and their medians and
ratio are printed. On a GPU (--device cuda) the marks wait for the device, which slows the step a little.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import dpo_loss  # noqa: E402
import train  # noqa: E402
from bench.tiny_model import write_tiny_model  # noqa: E402
from model_loader import load_model  # noqa: E402
from bookkeeping import config, runs  # noqa: E402
from formats import dtypes, pairs_file  # noqa: E402
from transforms import cpu_speedups  # noqa: E402


def now(device="cpu") -> float:
    """Wall-clock seconds once the device has finished what it was given (a CPU runs synchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class Marks:
    """Wall-clock marks set from inside the model's forward and backward."""

    def __init__(self, model, device):
        self.t, self.device = {}, device
        model.lm_head.register_forward_pre_hook(self.on_head_input)

    def on_head_input(self, module, inputs):
        self.t["body_forward_done"] = now(self.device)
        if inputs[0].requires_grad:  # fires when backward has gone through the head and the log-softmax
            inputs[0].register_hook(lambda grad: self.t.__setitem__("head_backward_done", now(self.device)))


def profile_step(model, optimizer, batch, micro_batch_size, loss_cfg, hw, marks, packed) -> dict:
    parts = dict.fromkeys(("collate", "body forward", "head + log-softmax forward", "loss",
                           "head + log-softmax backward", "body backward", "optimizer"), 0.0)
    n_tokens = padded = head_positions = 0
    for start in range(0, len(batch), micro_batch_size):
        micro = batch[start:start + micro_batch_size]
        t0 = now(hw.device)
        tensors = train.collate(micro, False, hw.device, packed)
        t1 = now(hw.device)
        chosen, rejected = train.forward_logps(model, tensors, hw)
        t2 = now(hw.device)
        losses, _, _ = dpo_loss.preference_loss(loss_cfg.loss, beta=loss_cfg.beta,
                                                **train.loss_inputs(chosen, rejected, micro, loss_cfg.options()))
        objective = losses.sum() / len(batch)
        t3 = now(hw.device)
        objective.backward()
        t4 = now(hw.device)
        parts["collate"] += t1 - t0
        parts["body forward"] += marks.t["body_forward_done"] - t1
        parts["head + log-softmax forward"] += t2 - marks.t["body_forward_done"]
        parts["loss"] += t3 - t2
        parts["head + log-softmax backward"] += marks.t["head_backward_done"] - t3
        parts["body backward"] += t4 - marks.t["head_backward_done"]
        R, T = tensors["input_ids"].shape
        n_tokens += tensors["n_tokens"]
        padded += R * T
        head_positions += len(tensors["targets"])  # the positions that score a response token
    t = now(hw.device)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    parts["optimizer"] = now(hw.device) - t
    return {"parts": parts, "n_tokens": n_tokens, "padded": padded, "head_positions": head_positions}


def flops(model, n_tokens, head_positions, recompute: bool) -> float:
    cfg = model.config
    body = sum(p.numel() for name, p in model.named_parameters()
               if name.startswith("model.layers.") and p.dim() == 2)  # the linear layers' weights
    per_param = 8 if recompute else 6
    return per_param * body * n_tokens + per_param * cfg.vocab_size * cfg.hidden_size * head_positions


def tiny_records(model, n, seed=0) -> list[dict]:
    """Random token-id pairs for --tiny: prompts of 8 to 23 tokens, responses of 4 to 15."""
    gen = torch.Generator().manual_seed(seed)
    ids = lambda low, high: torch.randint(0, model.config.vocab_size, (int(torch.randint(low, high, (1,),  # noqa: E731
                                                                                            generator=gen)),),
                                          generator=gen).tolist()
    return [{"id": str(i), "prompt_ids": ids(8, 24), "chosen_ids": (c := ids(4, 16)), "chosen_length": len(c),
             "rejected_ids": (r := ids(4, 16)), "rejected_length": len(r),
             "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0} for i in range(n)]


def main():
    parser = argparse.ArgumentParser(description="One DPO step's time by part, against the matmul floor.")
    parser.add_argument("--model", default="qwen", help="bundled model name or HF directory (default qwen)")
    parser.add_argument("--pairs", help="pairs file (mipo.py / train.py stage 1) sampled by --model")
    parser.add_argument("--steps", type=int, default=4, help="steps to time after one warm-up step (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="global batch (default 4, the CPU preset)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the global batch")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype (default: train.py's choice for this machine)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--layout", choices=("default", "packed", "rows", "both"), default="default",
                        help="training rows: packed, two causal rows per pair, both (alternating), or train.py's "
                             "default for the device (train.PACKED)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and random pairs: a check in seconds")
    args = parser.parse_args()
    args.micro_batch_size = args.micro_batch_size or args.batch_size
    if not args.tiny and not args.pairs:
        parser.error("--pairs is required (or --tiny)")

    dtype = dtypes.compute_dtype(args.dtype, args.device)
    peak_n = 256 if args.tiny else 2048
    peaks = {name: dtypes.matmul_peak(d, n=peak_n, device=args.device)
             for name, d in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
             if name in ("float32", dtype)}  # a bf16 product without native bf16 takes minutes to time
    needed = (args.steps + 1) * args.batch_size
    if args.tiny:
        with tempfile.TemporaryDirectory() as tmp:
            model, _ = load_model(write_tiny_model(Path(tmp) / "tiny"), args.device, torch.float32)
        records = tiny_records(model, needed)
    else:
        model, tokenizer = load_model(args.model, args.device, torch.float32)
        pairs = pairs_file.read_pairs(args.pairs)
        records = [{**train.tokenize_pair(tokenizer, p, False, model.config.max_position_embeddings),
                    "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0} for p in pairs]
    if len(records) < needed:
        sys.exit(f"--pairs {args.pairs}: {len(records)} pairs, {needed} needed for {args.steps} + 1 steps")
    hw = config.HardwareConfig(device=args.device, dtype=dtype, gradient_checkpointing=args.gradient_checkpointing)
    loss_cfg = config.LossConfig(loss="sigmoid", beta=0.1)
    model.train()
    model.gradient_checkpointing = args.gradient_checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    cpu_speedups.apply(model)  # as train.py does after loading
    cpu_speedups.for_dpo(model, 1, False)  # and before DPO
    marks = Marks(model, args.device)
    default = train.PACKED.get(torch.device(args.device).type, False)
    layouts = {"default": [default], "packed": [True], "rows": [False], "both": [True, False]}[args.layout]
    order = train.epoch_order(len(records), 0, 0)
    results = {packed: [] for packed in layouts}
    for k in range(args.steps + 1):
        batch = [records[i] for i in order[k * args.batch_size:(k + 1) * args.batch_size]]
        for packed in layouts:  # both: the same batch in each layout, one after the other
            t = now(args.device)
            result = profile_step(model, optimizer, batch, args.micro_batch_size, loss_cfg, hw, marks, packed)
            result["step"] = now(args.device) - t
            if k:  # the first step pays for warm-up (oneDNN kernels, AdamW's state allocation)
                results[packed].append(result)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        runs.save_checkpoint(Path(tmp) / "checkpoint.pt", model, optimizer, 1)
        checkpoint_s = time.perf_counter() - t
        checkpoint_gb = (Path(tmp) / "checkpoint.pt").stat().st_size / 1e9

    print(f"\nDPO step, {'tiny' if args.tiny else args.model}, global batch {args.batch_size} "
          f"(micro-batch {args.micro_batch_size}), {dtype} compute on {args.device}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps")
    print(f"matmul peak ({peak_n}^3): " + ", ".join(f"{name} {peak / 1e9:.0f} GFLOP/s" for name, peak in peaks.items()))
    step_s = {}
    for packed, layout_results in results.items():
        step_s[packed] = report(layout_results, "packed rows" if packed else "two causal rows per pair", model,
                                args.gradient_checkpointing, peaks, dtype)
    print(f"{'checkpoint write (every --save-minutes)':<30} {checkpoint_s:.2f} s, {checkpoint_gb:.2f} GB")
    if len(step_s) == 2:
        print(f"two causal rows / packed: step {step_s[False] / step_s[True]:.2f}x the time "
              f"({step_s[False]:.2f} s against {step_s[True]:.2f} s)")


def report(results, layout, model, recompute, peaks, dtype) -> float:
    """Print one layout's parts and floor -> its median step seconds."""
    step_s = statistics.median(r["step"] for r in results)
    print(f"-- {layout}")
    print(f"{'part':<30}{'s':>8}{'share':>8}")
    for part in results[0]["parts"]:
        s = statistics.median(r["parts"][part] for r in results)
        print(f"{part:<30}{s:>8.2f}{s / step_s:>8.0%}")
    print(f"{'step':<30}{step_s:>8.2f}")
    tokens = statistics.median(r["n_tokens"] for r in results)
    padding = statistics.median(1 - r["n_tokens"] / r["padded"] for r in results)
    step_flops = statistics.median(flops(model, r["n_tokens"], r["head_positions"], recompute) for r in results)
    floor = step_flops / peaks[dtype]
    print(f"real tokens per step {tokens:.0f}, padding share {padding:.0%}; {step_flops / 1e12:.2f} TFLOP per step")
    print(f"floor at the {dtype} peak: {floor:.2f} s; measured {step_s:.2f} s: {floor / step_s:.0%} of the floor "
          f"(at the float32 peak: {step_flops / peaks['float32'] / step_s:.0%}, "
          f"achieved {step_flops / step_s / 1e9:.0f} GFLOP/s)")
    return step_s


if __name__ == "__main__":
    main()
