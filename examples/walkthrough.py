"""MIPO end to end on a CPU, narrated stage by stage: the companion of docs/walkthrough.md.

It runs the real pipeline, `python train.py` on the bundled SmolLM2-135M-Instruct (`--model llama`) with tiny
settings (8 persona prompts, 32 new tokens, 4 DPO steps of 2 pairs), then reads the run directory train.py wrote
and prints what the paper talks about, in the order the paper does it:

  stage 1  one contrastive pair in full: x with the user's stated preferences, x', y+ ~ pi_ref(.|x), y- ~ pi_ref(.|x')
  stage 2  its frozen reference log-probs, and the 2 x 2 table log pi_ref(y+ or y- | x or x') they come from
  stage 3  DPO: step 0 (policy = reference: rewards 0, loss ln 2), then loss and reward accuracy step by step
  stage 4  the pointwise-MI meter on held-out prompts: the base model's PMI of the base model's answers and of the
           trained model's answers (what MIPO claims to raise), and the trained model's own score of its answers;
           then the path of the run's page, RUN/pmi.html, where every token of those answers is shaded by its term

Nothing here re-implements the method: every number comes from train.py's files or from calling the project's
own functions (mipo.response_logps, mipo.mi_meter, dpo_loss.preference_loss, mipo.sample_responses).

    python examples/walkthrough.py                      # a fresh temporary run directory, kept afterwards
    python examples/walkthrough.py --out runs/walk      # run it again with the same --out: every stage is reused
    python examples/walkthrough.py --negative random    # the other kind of negative
    python examples/walkthrough.py --lr 1e-4            # too far: the model learns to echo the user's context
"""
import argparse
import json
import math
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the top-level modules, from any working directory

import torch  # noqa: E402

import mipo  # noqa: E402
import sampler  # noqa: E402
import tasks  # noqa: E402
from dpo_loss import LOSSES, preference_loss  # noqa: E402
from model_loader import load_model  # noqa: E402
from bookkeeping import pmi_page  # noqa: E402
from formats import pairs_file  # noqa: E402
from formats.files import MipoError, read_jsonl, run_command  # noqa: E402

LN2 = math.log(2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Run MIPO end to end on a tiny budget and print each stage.")
    parser.add_argument("--model", default="llama",
                        help="bundled model or HF directory (default llama: SmolLM2-135M-Instruct)")
    parser.add_argument("--task", default="persona",
                        help="task (default persona: stated preferences + a real question)")
    parser.add_argument("--negative", choices=tasks.NEGATIVES, default=None,
                        help="kind of negative (default: the task's)")
    parser.add_argument("--n", type=int, default=8, help="training prompts, hence pairs (default 8)")
    parser.add_argument("--n-eval", type=int, default=4, help="held-out prompts for the MI meter (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per response (default 32)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per DPO step (default 2: --n 8 gives 4 steps)")
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5: 20x the paper's "
                        "5e-7, so that 4 steps visibly move a 135M model; 1e-4 overshoots)")
    parser.add_argument("--warmup-ratio", type=float, default=0.03, help="the paper's warmup (default 0.03: "
                        "ceil(3%%) of the steps, so the first step runs at lr 0)")
    parser.add_argument("--loss", default="sigmoid", help="preference loss (default sigmoid: DPO, as MIPO)")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta (default 0.1, the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling and the data order")
    parser.add_argument("--pair", type=int, default=0, help="which training pair to print (default the first)")
    parser.add_argument("--out", default=None, help="run directory (default: a new temporary directory, kept)")
    return parser.parse_args(argv)


def heading(text: str):
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}")


def show(label: str, text: str):
    """A label, then the text verbatim, each line behind '| ' so that blank lines and edges stay visible."""
    print(f"  {label}")
    for line in (text.splitlines() or [""]):
        for piece in (textwrap.wrap(line, 94, drop_whitespace=False) or [""]):
            print(f"    | {piece}")


def run_train(args, out: Path) -> list[str]:
    """train.py as a user runs it; its own output goes to OUT/train.log. Returns the command line."""
    argv = ["--model", args.model, "--task", args.task, "--n", str(args.n), "--n-eval", str(args.n_eval),
            "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
            "--micro-batch-size", str(args.batch_size), "--lr", f"{args.lr:g}",
            "--warmup-ratio", f"{args.warmup_ratio:g}", "--loss", args.loss,
            "--beta", f"{args.beta:g}", "--seed", str(args.seed), "--save-every", "1000",
            # float32: the cross-checks below compare numbers computed by two code paths to ~1e-5 nats
            "--dtype", "float32", "--device", "cpu", "--out", str(out)]
    if args.negative:
        argv += ["--negative", args.negative]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "a") as log:
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = (out / "train.log").read_text().strip().splitlines()[-5:]
        raise MipoError(f"train.py failed (exit {result.returncode}); the end of {out / 'train.log'}:\n  "
                        + "\n  ".join(tail))
    return ["python", "train.py", *argv]


def two_by_two(model, tokenizer, pair: dict) -> torch.Tensor:
    """(2, 2) summed log-probs [[log p(y+|x), log p(y-|x)], [log p(y+|x'), log p(y-|x')]] of one pair
    (mipo.encode_turn + mipo.response_logps: the pointwise-MI meter's code, separate from train.py's forward)."""
    rows = [mipo.encode_turn(tokenizer, prompt, pair[key][0]["content"], pair.get(f"{key}_stopped", True))
            for prompt in (pair["prompt"], pair["negative_prompt"]) for key in ("chosen", "rejected")]
    return mipo.response_logps(model, rows).view(2, 2)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mipo-walkthrough-"))
    t_start = time.time()

    heading(f"MIPO walkthrough: {args.model}, task {args.task}, {args.n} pairs, "
            f"{args.n // args.batch_size} DPO steps of {args.batch_size} pairs, run directory {out}")
    command = run_train(args, out)
    t_train = time.time() - t_start
    print("ran:  " + " ".join(command))
    print(f"      ({t_train:.0f} s; train.py's own output is in {out / 'train.log'})")
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    timings = summary["timings_s"]
    pairs = pairs_file.read_pairs(out / "pairs.jsonl")
    references = {r["id"]: r for r in read_jsonl(out / "reference.jsonl")}
    history = read_jsonl(out / "metrics.jsonl")
    beta, loss_type = config["loss"]["beta"], config["loss"]["loss"]
    pair = pairs[args.pair]
    ref = references[pair["id"]]

    # ------------------------------------------------------------------------------------------- stage 1
    heading(f"stage 1  contrastive pairs   mipo.py:build_pairs   {timings.get('pairs', 0):.0f} s   -> pairs.jsonl "
            f"({len(pairs)} pairs), eval_pairs.jsonl")
    kind = pair["negative"]
    where = {"incomplete": "x' = x without the user's stated preferences (mipo.py:negative_example); y- ~ pi_ref(.|x')",
             "random": "x' = the prompt of another training item, chosen by mipo.py:derangement; y- is the response "
                       "already sampled for it (its own y+): one sampling pass",
             "random-resample": "x' = another training item's prompt (with a user context: the same request under "
                                "that item's context), chosen by mipo.py:derangement; y- ~ pi_ref(.|x') sampled "
                                "afresh"}[kind]
    print(f"pair {args.pair} ({pair['id']}), --negative {kind}: {where}; negative_source = {pair['negative_source']!r}")
    show("x, the prompt (the user turn; the chat template adds the model's default system prompt):",
         pair["prompt"][0]["content"])
    show("x', the prompt the negative was sampled from:", pair["negative_prompt"][0]["content"])
    stopped = {k: "ended with end-of-turn" if pair[f"{k}_stopped"] else f"cut at {args.max_new_tokens} tokens"
               for k in ("chosen", "rejected")}
    show(f"chosen y+ ~ pi_ref(.|x)  [{stopped['chosen']}]:", pair["chosen"][0]["content"])
    show(f"rejected y- ~ pi_ref(.|x')  [{stopped['rejected']}], stored under the ORIGINAL prompt x:",
         pair["rejected"][0]["content"])
    stats = summary["pairs"]
    print(f"responses cut at {args.max_new_tokens} tokens over all {stats['pairs']} pairs: "
          f"chosen {stats['chosen_truncated']:.0%}, rejected {stats['rejected_truncated']:.0%} "
          "(a pair with one side cut also teaches when to stop: --drop-truncated)")

    # ------------------------------------------------------------------------------------------- stage 2
    heading(f"stage 2  frozen reference log-probs   train.py:reference_logps   {timings.get('reference', 0):.0f} s   "
            "-> reference.jsonl")
    print(f"log pi_ref(y+|x) = {ref['ref_chosen_logps']:9.3f} nats over {ref['chosen_length']} tokens "
          f"({ref['ref_chosen_logps'] / ref['chosen_length']:.3f} per token)")
    print(f"log pi_ref(y-|x) = {ref['ref_rejected_logps']:9.3f} nats over {ref['rejected_length']} tokens "
          f"({ref['ref_rejected_logps'] / ref['rejected_length']:.3f} per token)")
    print("(sums over the response tokens incl. the end-of-turn token when the sample stopped: train.py:forward_logps)")
    t_extra = time.time()
    base, tokenizer = load_model(args.model, "cpu", torch.float32)
    pairs_file.use_recorded_date(tokenizer, pairs, out / "pairs.jsonl")  # the prompts as train.py rendered them
    before = two_by_two(base, tokenizer, pair)
    print("\nthe same pair scored again, each response as its own sequence (mipo.py:response_logps), "
          "under x and under x':")
    print(f"{'':>14}{'y+':>12}{'y-':>12}")
    print(f"{'under x':>14}{before[0, 0]:12.3f}{before[0, 1]:12.3f}   <- the two numbers DPO uses (reference.jsonl)")
    print(f"{'under x_prime':>14}{before[1, 0]:12.3f}{before[1, 1]:12.3f}   "
          "<- only the meter and --loss infonce/sami use these")
    agreement = max(abs(before[0, 0].item() - ref["ref_chosen_logps"]),
                    abs(before[0, 1].item() - ref["ref_rejected_logps"]))
    print(f"cross-check: train.py's packed forward and mipo.py:response_logps agree to {agreement:.1e} nats")
    print(f"pointwise MI of this pair under the base model, log pi_ref(y|x) - log pi_ref(y|x'):  "
          f"y+ {before[0, 0] - before[1, 0]:+.3f} nats,  y- {before[0, 1] - before[1, 1]:+.3f} nats")

    # ------------------------------------------------------------------------------------------- stage 3
    heading(f"stage 3  DPO   train.py:train -> dpo_loss.py:preference_loss ({loss_type}, beta {beta:g})   "
            f"{timings.get('train', 0):.0f} s   -> metrics.jsonl")
    first = history[0]
    print("step 0, before any update (metrics.jsonl line 1): the policy IS the reference, so every log-ratio is 0")
    print(f"  max |log pi - log pi_ref| = {first['step0/max_abs_logp_diff']:.2e} nats   (train.py:step0_check: "
          f"{'OK' if first['step0/ok'] else 'MISMATCH'})")
    print(f"  rewards/chosen = {first['rewards/chosen']:.4f}   rewards/rejected = {first['rewards/rejected']:.4f}   "
          f"(implicit reward beta * log pi/pi_ref)")
    print(f"  loss = {first['loss']:.4f}   ln 2 = {LN2:.4f}   (-log sigmoid(0): a coin flip between y+ and y-)")
    print(f"  rewards/accuracies = {first['rewards/accuracies']:.2f}   (strict chosen > rejected: ties count as wrong)")
    print("\nstep by step (a step's loss and rewards are measured BEFORE its update, on pairs not yet trained on; "
          "the paper's warmup starts at lr 0, so with any warmup the first update moves nothing):")
    print(f"{'step':>6}{'lr':>10}{'loss':>9}{'reward acc':>12}{'margin':>10}{'chosen r':>11}{'rejected r':>12}")
    for m in history:
        print(f"{m['step']:>6}{m['lr']:>10.2e}{m['loss']:>9.4f}{m['rewards/accuracies']:>12.2f}"
              f"{m['rewards/margins']:>10.4f}{m['rewards/chosen']:>11.4f}{m['rewards/rejected']:>12.4f}")
    last = history[-1]
    print(f"after {len(history)} steps: loss {first['loss']:.4f} -> {last['loss']:.4f}, reward accuracy "
          f"{first['rewards/accuracies']:.2f} -> {last['rewards/accuracies']:.2f}")
    trained, _ = load_model(out / "final", "cpu", torch.float32)
    after = two_by_two(trained, tokenizer, pair)
    lengths = torch.tensor([ref["chosen_length"]]), torch.tensor([ref["rejected_length"]])
    options = {"logps_matrix": after[None]} if LOSSES[loss_type].negative_prompt else {}
    pair_loss, chosen_reward, rejected_reward = preference_loss(
        loss_type, after[0, :1], after[0, 1:], before[0, :1], before[0, 1:], *lengths, beta=beta, **options)
    print(f"\npair {args.pair} under the trained model (final/): log pi(y+|x) {before[0, 0]:.3f} -> {after[0, 0]:.3f}, "
          f"log pi(y-|x) {before[0, 1]:.3f} -> {after[0, 1]:.3f}")
    print(f"  implicit rewards: chosen {chosen_reward.item():+.4f}, rejected {rejected_reward.item():+.4f}; "
          f"its loss {pair_loss.item():.4f} (was ln 2 = {LN2:.4f})   (dpo_loss.py:preference_loss)")

    # ------------------------------------------------------------------------------------------- stage 4
    heading(f"stage 4  final model + held-out meter   mipo.py:trained_meter -> mipo.py:mi_meter   "
            f"{timings.get('held_out_eval', 0):.0f} s   -> final/, summary.json")
    base_eval, trained_eval = summary["base_eval"], summary["trained_eval"]
    if not (base_eval and trained_eval):
        print("no held-out prompts (--n-eval 0): no meter")
    else:
        n = base_eval["pairs"]
        print(f"pointwise MI log pi_ref(y|x) - log pi_ref(y|x') under the BASE model, mean over {n} held-out prompts, "
              f"y = each model's own sample from x:")
        print(f"  MI before (base model's answers)    {base_eval['pmi']:8.3f} nats")
        print(f"  MI after  (trained model's answers) {trained_eval['pmi']:8.3f} nats   <- what MIPO claims to raise")
        print(f"  the trained model's answers scored by the trained model itself: {trained_eval['pmi_self']:.3f} nats "
              f"(pmi_self: it also rises when a model only grows more confident)")
        print(f"  answer length {base_eval['length']:.1f} -> {trained_eval['length']:.1f} tokens, cut at the limit "
              f"{base_eval['truncated']:.0%} -> {trained_eval['truncated']:.0%}")
        # Recomputed here: the trained model's samples, drawn exactly as train.py drew them, scored under pi_ref.
        cfg = config["pairs"]
        sampling = mipo.resolve_sampling(sampler.Sampling(**cfg["sampling"]), cfg["model"])
        held_out_pairs = pairs_file.read_pairs(out / "eval_pairs.jsonl")
        pairs_file.use_recorded_date(tokenizer, held_out_pairs, out / "eval_pairs.jsonl")
        prompts = [tokenizer.apply_chat_template(p["prompt"]) for p in held_out_pairs]
        own = mipo.sample_responses(trained, tokenizer, prompts, sampling, cfg["seed"], 2 * cfg["sample_batch_size"])
        task = tasks.get_task(cfg["task"])
        examples = tasks.load_examples(task, "eval", cfg["n_eval"], cfg["data"], cfg["eval_data"])
        under_base = mipo.mi_meter(base, tokenizer, mipo.meter_rows(task, examples, own))["pmi"]
        print(f"  cross-check: the trained model's samples drawn again and scored under the BASE model here: "
              f"{under_base:.3f} nats")
        show("held-out prompt 0:", held_out_pairs[0]["prompt"][0]["content"])
        show("  the base model's answer (eval_pairs.jsonl):", held_out_pairs[0]["chosen"][0]["content"])
        show("  the trained model's answer (sampled with the same seed):", own[0][0])
    t_extra = time.time() - t_extra

    page = pmi_page.write_run_page(out)  # train.py wrote it too; written again here from the run's files
    print(f"\nthe held-out answers token by token, each token shaded by its term of the base model's pmi, and the "
          f"pairs: {page}\n(open it in a browser; bookkeeping/pmi_page.py:write_run_page)")

    heading("time")
    print("train.py: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items())
          + f"; this script's own checks {t_extra:.0f} s; total {time.time() - t_start:.0f} s")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"run directory: {out} ({size / 1e9:.1f} GB, mostly final/; delete it when done)")
    print(f"next: python eval.py --model {out} --n 4 --judge none --max-new-tokens 32")


if __name__ == "__main__":
    run_command(main)
