"""Where one DPO step of train.py spends its time, and how far it is from the matrix-product floor of the same
machine, measured in the same run.

    python bench/profile_step.py --model qwen --pairs runs/qwen-persona-incomplete-sigmoid/pairs.jsonl

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
from model_loader import load_model  # noqa: E402
from bookkeeping import config, runs  # noqa: E402
from formats import dtypes, pairs_file  # noqa: E402
from transforms import cpu_speedups  # noqa: E402


class Marks:
    """Wall-clock marks set from inside the model's forward and backward (a CPU runs both synchronously)."""

    def __init__(self, model):
        self.t = {}
        model.lm_head.register_forward_pre_hook(self.on_head_input)

    def on_head_input(self, module, inputs):
        self.t["body_forward_done"] = time.perf_counter()
        if inputs[0].requires_grad:  # fires when backward has gone through the head and the log-softmax
            inputs[0].register_hook(lambda grad: self.t.__setitem__("head_backward_done", time.perf_counter()))


def profile_step(model, optimizer, batch, micro_batch_size, loss_cfg, hw, marks) -> dict:
    parts = dict.fromkeys(("collate", "body forward", "head + log-softmax forward", "loss",
                           "head + log-softmax backward", "body backward", "optimizer"), 0.0)
    n_tokens = padded = head_positions = 0
    for start in range(0, len(batch), micro_batch_size):
        micro = batch[start:start + micro_batch_size]
        t0 = time.perf_counter()
        tensors = train.collate(micro, False, hw.device)
        t1 = time.perf_counter()
        chosen, rejected = train.forward_logps(model, tensors, hw)
        t2 = time.perf_counter()
        losses, _, _ = dpo_loss.preference_loss(loss_cfg.loss, beta=loss_cfg.beta,
                                                **train.loss_inputs(chosen, rejected, micro, loss_cfg.options()))
        objective = losses.sum() / len(batch)
        t3 = time.perf_counter()
        objective.backward()
        t4 = time.perf_counter()
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
    t = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    parts["optimizer"] = time.perf_counter() - t
    return {"parts": parts, "n_tokens": n_tokens, "padded": padded, "head_positions": head_positions}


def flops(model, n_tokens, head_positions, recompute: bool) -> float:
    cfg = model.config
    body = sum(p.numel() for name, p in model.named_parameters()
               if name.startswith("model.layers.") and p.dim() == 2)  # the linear layers' weights
    per_param = 8 if recompute else 6
    return per_param * body * n_tokens + per_param * cfg.vocab_size * cfg.hidden_size * head_positions


def main():
    parser = argparse.ArgumentParser(description="One DPO step's time by part, against the matmul floor.")
    parser.add_argument("--model", default="qwen", help="bundled model name or HF directory (default qwen)")
    parser.add_argument("--pairs", required=True, help="pairs file (mipo.py / train.py stage 1) sampled by --model")
    parser.add_argument("--steps", type=int, default=4, help="steps to time after one warm-up step (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="global batch (default 4, the CPU preset)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the global batch")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype (default: train.py's choice for this machine)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    args.micro_batch_size = args.micro_batch_size or args.batch_size

    dtype = dtypes.compute_dtype(args.dtype, "cpu")
    peaks = {name: dtypes.matmul_peak(d) for name, d in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
             if name in ("float32", dtype)}  # a bf16 product without native bf16 takes minutes to time
    model, tokenizer = load_model(args.model, "cpu", torch.float32)
    pairs = pairs_file.read_pairs(args.pairs)
    records = [{**train.tokenize_pair(tokenizer, p, False, model.config.max_position_embeddings),
                "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0} for p in pairs]
    needed = (args.steps + 1) * args.batch_size
    if len(records) < needed:
        sys.exit(f"--pairs {args.pairs}: {len(records)} pairs, {needed} needed for {args.steps} + 1 steps")
    hw = config.HardwareConfig(device="cpu", dtype=dtype, gradient_checkpointing=args.gradient_checkpointing)
    loss_cfg = config.LossConfig(loss="sigmoid", beta=0.1)
    model.train()
    model.gradient_checkpointing = args.gradient_checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    cpu_speedups.apply(model)  # as train.py does after loading
    cpu_speedups.for_dpo(model, 1, False)  # and before DPO
    marks = Marks(model)
    order = train.epoch_order(len(records), 0, 0)
    results = []
    for k in range(args.steps + 1):
        batch = [records[i] for i in order[k * args.batch_size:(k + 1) * args.batch_size]]
        t = time.perf_counter()
        result = profile_step(model, optimizer, batch, args.micro_batch_size, loss_cfg, hw, marks)
        result["step"] = time.perf_counter() - t
        if k:  # the first step pays for warm-up (oneDNN kernels, AdamW's state allocation)
            results.append(result)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        runs.save_checkpoint(Path(tmp) / "checkpoint.pt", model, optimizer, 1)
        checkpoint_s = time.perf_counter() - t
        checkpoint_gb = (Path(tmp) / "checkpoint.pt").stat().st_size / 1e9

    step_s = statistics.median(r["step"] for r in results)
    print(f"\nDPO step, {args.model}, global batch {args.batch_size} (micro-batch {args.micro_batch_size}), "
          f"{dtype} compute, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{torch.get_num_threads()} threads, median of {len(results)} steps")
    print("matmul peak (2048^3): " + ", ".join(f"{name} {peak / 1e9:.0f} GFLOP/s" for name, peak in peaks.items()))
    print(f"{'part':<30}{'s':>8}{'share':>8}")
    for part in results[0]["parts"]:
        s = statistics.median(r["parts"][part] for r in results)
        print(f"{part:<30}{s:>8.2f}{s / step_s:>8.0%}")
    print(f"{'step':<30}{step_s:>8.2f}")
    print(f"{'checkpoint write (every --save-minutes)':<30} {checkpoint_s:.2f} s, {checkpoint_gb:.2f} GB")
    tokens = statistics.median(r["n_tokens"] for r in results)
    padding = statistics.median(1 - r["n_tokens"] / r["padded"] for r in results)
    step_flops = statistics.median(flops(model, r["n_tokens"], r["head_positions"], args.gradient_checkpointing)
                                   for r in results)
    floor = step_flops / peaks[dtype]
    print(f"real tokens per step {tokens:.0f}, padding share {padding:.0%}; {step_flops / 1e12:.2f} TFLOP per step")
    print(f"floor at the {dtype} peak: {floor:.2f} s; measured {step_s:.2f} s: {floor / step_s:.0%} of the floor "
          f"(at the float32 peak: {step_flops / peaks['float32'] / step_s:.0%}, "
          f"achieved {step_flops / step_s / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
