"""train.py end to end on a tiny random model with a word-level tokenizer: the loss goes down, the policy equals
the stored reference at step 0, the update does not depend on the micro-batch split or on the number of
processes, a killed run resumes to the same weights, the saved model loads in transformers with the same
logits, and bad input or a NaN loss ends the run with one line and exit status 2."""
import errno
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import dpo_loss
import mipo
import model_loader
import tasks
import train
from bookkeeping import config, held_out, report, runs
from formats import pairs_file
from transforms import cpu_speedups, shard
from conftest import RunsCodeWhenUnpickled, make_tiny_model, naive_sequence_logps
from model_loader import load_model, save_model
from formats.files import MipoError, read_jsonl

from bench.tiny_model import VOCAB, write_prompts, write_tiny_model

REPO = Path(__file__).resolve().parent.parent


def make_assets(root: Path) -> dict:
    """The tiny model and 16 prompts under root, where the runs of a test module go too."""
    return {"model": write_tiny_model(root / "tiny"), "data": write_prompts(root / "prompts.jsonl", 16), "root": root}


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("train"))


def args_for(assets, out, *extra, n=8, model=None):
    # random-resample: y- sampled afresh from another prompt. With the default (another prompt's positive reused as
    # y-), each response is chosen in one pair and rejected in another, and a tiny random model's loss oscillates
    # over these few steps instead of falling; the pairing itself is tested in test_mipo.py.
    return ["--model", str(model or assets["model"]), "--task", "jsonl", "--data", str(assets["data"]),
            "--negative", "random-resample", "--n", str(n), "--n-eval", "0", "--max-new-tokens", "6",
            "--temperature", "1.0", "--lr", "1e-3", "--batch-size", "4", "--sample-batch-size", "2",
            "--dtype", "float32", "--device", "cpu", "--out", str(out), *extra]


def run_cli(args, launcher=(sys.executable,), env=None):
    if "torch.distributed.run" in launcher:  # torchrun reads --n as an abbreviation of its own flags without the --
        args = ["--", *args]
    # Ctrl-C as in a terminal: a shell starts background jobs with SIGINT ignored, and Python keeps that.
    return subprocess.run([*launcher, str(REPO / "train.py"), *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def completed_run(assets, name: str, *flags):
    """train.py with the test settings and flags, uninterrupted, in a process of its own: (its --out, its result)."""
    out = assets["root"] / name
    result = run_cli(args_for(assets, out, *flags))
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict:
    return load_file(out / "final" / "model.safetensors")


def assert_same_metrics(got: Path, want: Path):
    """Two runs logged the same loss, gradient norm and rewards at every step, to float rounding (relative 1e-5).
    The gradient norm is logged before clipping, so a gradient off by any factor (a sum where a mean belongs, a
    missing division by the number of processes) fails here, though AdamW's lr * sign(g) first step would hide it
    from the weights. A reward is beta times the difference of two log-probs of about 15 nats, each summed in
    float32 to about 1e-6 (measured: rewards differ by up to 7e-8): 1e-6 absolute on top of the relative bound."""
    got, want = metrics(got), metrics(want)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got, want):
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), (g["step"], key)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (g["step"], key)


def copy_model(assets, to: Path) -> Path:
    shutil.copytree(assets["model"], to)
    return to


def perturb_weights(model_dir: Path):
    """Change every weight of a model directory: a run that starts from it again cannot end where it ended."""
    state = load_file(model_dir / "model.safetensors")
    save_file({k: v * 1.25 + 0.01 for k, v in state.items()}, model_dir / "model.safetensors",
              metadata={"format": "pt"})


def file_identity(out: Path, names) -> dict:
    """Content, modification time and inode of each file: equal afterwards means nobody wrote or replaced it."""
    return {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns, (out / n).stat().st_ino) for n in names}


def assert_same_update(got: dict, want: dict, assets):
    """Two runs from the same start reached the same weights, up to float rounding, which differs with how the
    batch is split. Adam divides by sqrt(v) and so magnifies it where a gradient is near 0: the bound is 1% of
    the tensor's largest move rather than machine precision."""
    start = load_file(assets["model"] / "model.safetensors")
    for name in want:
        moved = (want[name] - start[name]).abs().max().item()
        assert moved > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5 + 1e-2 * moved)


@pytest.fixture(scope="session")
def baseline(assets):
    """One uninterrupted run: 8 pairs, 2 epochs of batch 4, a checkpoint every 2 steps (4 steps in all)."""
    out = assets["root"] / "baseline"
    train.main(args_for(assets, out, "--epochs", "2", "--save-every", "2"))
    return out


# ---------------------------------------------------------------------------------------------------- training


def test_loss_decreases_and_every_stage_writes_its_file(assets, baseline):
    history = metrics(baseline)
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    assert history[-1]["rewards/margins"] > 0
    for name in ("config.json", "pairs.jsonl", "reference.jsonl", "metrics.jsonl", "summary.json", "final/config.json"):
        assert (baseline / name).exists(), name
    assert not (baseline / "checkpoint.pt").exists()  # removed once the final model is written
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "lr", "grad_norm", "tokens/s"):
        assert all(math.isfinite(m[key]) for m in history), key


def test_step0_policy_equals_stored_reference(baseline):
    # Step 0 repeats the reference pass's computation on the same micro-batches: equal to the last bit.
    first = metrics(baseline)[0]
    assert first["step0/ok"] and first["step0/max_abs_logp_diff"] == 0
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/accuracies"] == 0
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-7)


def test_step0_check_catches_reference_from_another_model(assets, baseline, tmp_path):
    # The same pairs scored by a different model: the check must fail loudly, not pass quietly.
    out = tmp_path / "other"
    out.mkdir()
    for name in ("config.json", "pairs.jsonl"):
        (out / name).write_text((baseline / name).read_text().replace(str(baseline), str(out)))
    records = [json.loads(line) for line in (baseline / "reference.jsonl").read_text().splitlines()]
    other, _ = load_model(write_tiny_model(tmp_path / "tiny-seed1", seed=1))
    with torch.no_grad():
        chosen, rejected = train.forward_logps(other, train.collate(records, False, "cpu"), config.HardwareConfig())
    for i, r in enumerate(records):
        r["ref_chosen_logps"], r["ref_rejected_logps"] = chosen[i].item(), rejected[i].item()
    (out / "reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    train.main(args_for(assets, out, "--epochs", "2", "--save-every", "2"))
    first = metrics(out)[0]
    assert not first["step0/ok"] and first["step0/max_abs_logp_diff"] > 1.0


@pytest.mark.parametrize("packed", [True, False])
def test_packed_row_scores_each_response_as_a_separate_sequence(assets, baseline, packed):
    # [x, y+, x[-1], y-] in one row under the branch mask, or [x, y+] and [x, y-] as two causal rows without one,
    # equals x + y+ and x + y- run alone (and with x').
    model, _ = load_model(assets["model"])
    records = [json.loads(line) for line in (baseline / "reference.jsonl").read_text().splitlines()][:3]
    for r in records:
        r["negative_prompt_ids"] = r["prompt_ids"][:-2] + [17, 23]  # any other prompt
    with torch.no_grad():
        batch = train.collate(records, True, "cpu", packed=packed)
        assert (batch["mask"] is None) == (not packed) and len(batch["input_ids"]) == 6 * (2 - packed)
        chosen, rejected = train.forward_logps(model, batch, config.HardwareConfig())
        for i, r in enumerate(records * 2):
            prompt = r["prompt_ids"] if i < len(records) else r["negative_prompt_ids"]
            for packed, response in ((chosen[i], r["chosen_ids"]), (rejected[i], r["rejected_ids"])):
                logits = model(torch.tensor([prompt + response]))[0, len(prompt) - 1:-1]  # (len(response), V)
                alone = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).sum()
                assert abs(packed.item() - alone.item()) < 1e-4


def autograd_token_logps(logits, targets):
    # The log-prob of each target as autograd differentiates it: the code before dpo_loss.TokenLogps.
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dpo_step_loss_and_gradients_equal_plain_autograd(baseline, monkeypatch, dtype):
    """The DPO step's loss and every parameter's gradient, with dpo_loss.TokenLogps's hand-written backward and
    with autograd's, on a model whose output projection is tied to its embedding (as the bundled llama's): equal to
    the bit."""
    records = [json.loads(line) for line in (baseline / "reference.jsonl").read_text().splitlines()][:4]
    hw, loss_cfg = config.HardwareConfig(dtype=dtype), config.LossConfig()

    def step():
        model = make_tiny_model("qwen2", tie_word_embeddings=True, vocab_size=300).train()
        chosen, rejected = train.forward_logps(model, train.collate(records, False, "cpu"), hw)
        losses, _, _ = dpo_loss.preference_loss(loss_cfg.loss, beta=loss_cfg.beta,
                                                **train.loss_inputs(chosen, rejected, records, loss_cfg.options()))
        losses.mean().backward()
        return losses.detach(), {k: p.grad for k, p in model.named_parameters()}

    losses, grads = step()
    monkeypatch.setattr(dpo_loss.TokenLogps, "apply", autograd_token_logps)
    plain_losses, plain_grads = step()
    assert torch.equal(losses, plain_losses)
    assert grads.keys() == plain_grads.keys() and all(torch.equal(grads[k], plain_grads[k]) for k in grads)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sparse_embedding_gradient_gives_the_dense_gradients_and_update(baseline, dtype):
    """transforms/cpu_speedups.py's sparse embedding gradient on an untied model (as the bundled qwen): two
    micro-batches accumulated, an AdamW update, the gradients set to None, one more backward. Every gradient and
    weight equals the dense default's up to float rounding (a token that occurs twice sums its two rows in another
    order); a missed or doubled row fails."""
    records = [json.loads(line) for line in (baseline / "reference.jsonl").read_text().splitlines()][:4]
    hw = config.HardwareConfig(dtype=dtype)

    def run(sparse: bool):
        model = make_tiny_model("qwen2", vocab_size=300).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        if sparse:
            cpu_speedups.sparse_embedding_gradient(model.model.embed_tokens)
        grads = []
        for micro in ([records[:2], records[2:]], [records]):  # step 1 accumulates two micro-batches
            for batch in micro:
                chosen, rejected = train.forward_logps(model, train.collate(batch, False, "cpu"), hw)
                (chosen - 2 * rejected).sum().backward()
            grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
            assert not model.model.embed_tokens.weight.grad.is_sparse
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return grads, model.state_dict()

    (grads, weights), (dense_grads, dense_weights) = run(True), run(False)
    for step, dense_step, rtol in zip(grads, dense_grads, (1e-6, 1e-5)):  # step 2: after updates a rounding apart
        assert step.keys() == dense_step.keys()
        for k in step:  # each gradient as a whole: its largest difference against its largest entry
            assert (step[k] - dense_step[k]).abs().max() <= rtol * dense_step[k].abs().max(), k
    for k in weights:  # AdamW divides by sqrt(v) + eps: on a near-zero gradient a rounding moves the step by up to
        # ~1e-6 (measured 1.7e-6); a missed or doubled row moves it by about lr = 1e-2
        torch.testing.assert_close(weights[k], dense_weights[k], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_projecting_only_scored_positions_keeps_the_loss_and_gradients(baseline, dtype):
    """forward_logps sends only the positions that score a response token through the output projection. The
    whole (R, T, V) logits with a plain log-softmax over each response's mask give
    the same log-probs, loss and gradients up to float rounding (a sum in another order; in bf16 also matrix
    products of other shapes)."""
    records = [json.loads(line) for line in (baseline / "reference.jsonl").read_text().splitlines()][:4]
    hw, loss_cfg = config.HardwareConfig(dtype=dtype), config.LossConfig()

    def step(scored_only: bool):
        model = make_tiny_model("qwen2", tie_word_embeddings=True, vocab_size=300).train()
        batch = train.collate(records, False, "cpu")
        if scored_only:
            chosen, rejected = train.forward_logps(model, batch, hw)
        else:
            with train.autocast(hw):
                logits = model(batch["input_ids"], batch["positions"], batch["mask"])  # (R, T, V)
            masks = torch.zeros(2, *batch["input_ids"].shape, dtype=torch.bool)  # y+ and y- tokens of each row
            for i, r in enumerate(records):
                P, C, N = len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])
                masks[0, i, P:P + C], masks[1, i, P + C + 1:P + C + 1 + N] = True, True
            chosen, rejected = (naive_sequence_logps(logits, batch["input_ids"], mask) for mask in masks)
        losses, _, _ = dpo_loss.preference_loss(loss_cfg.loss, beta=loss_cfg.beta,
                                                **train.loss_inputs(chosen, rejected, records, loss_cfg.options()))
        losses.mean().backward()
        return (torch.stack([chosen, rejected]).detach(), losses.detach(),
                {k: p.grad for k, p in model.named_parameters()})

    (logps, losses, grads), (old_logps, old_losses, old_grads) = step(True), step(False)
    rtol = 1e-6 if dtype == "float32" else 1e-3
    torch.testing.assert_close(logps, old_logps, rtol=rtol, atol=0)
    # a function of log-prob differences; a pair the tiny model separates by ~60 nats has a loss near 1e-27, where a
    # rounding of its log-probs moves the loss by 1e-31: relatively much, absolutely nothing
    torch.testing.assert_close(losses, old_losses, rtol=10 * rtol, atol=1e-12)
    for k in grads:  # each gradient as a whole: its largest difference against its largest entry
        assert (grads[k] - old_grads[k]).abs().max() <= 10 * rtol * old_grads[k].abs().max(), k


def test_gradient_accumulation_gives_the_same_update(assets, baseline, tmp_path):
    out = tmp_path / "micro1"
    train.main(args_for(assets, out, "--epochs", "2", "--save-every", "2", "--micro-batch-size", "1"))
    assert_same_update(final_weights(out), final_weights(baseline), assets)


def test_saved_model_loads_in_transformers_with_identical_logits(baseline):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(baseline / "final", dtype=torch.float32).eval()
    ours, tokenizer = load_model(baseline / "final")
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "w5 w9 w17"}])])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < 1e-4
    assert tokenizer.chat_template and tokenizer.stop_token_ids == [209, 210]


def softplus(x: float) -> float:  # log(1 + e^x) = -log sigma(-x)
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


BETA, LN2 = 0.1, math.log(2)  # beta: train.py's default, which args_for keeps
# Step 0, where the policy is the reference: every log-ratio and margin h is 0. Each loss's value there, and
# |dloss/dh| there (for the losses of the margin alone), worked out by hand from its formula in dpo_loss.py:
# sigma(0) = 1/2, sigma'(0) = 1/4, 1 / (2 beta) = 5. robust and exo_pair run with label smoothing eps = 0.1.
STEP0 = {
    "sigmoid": (LN2, BETA / 2),  # -log sigma(beta h)
    "robust": (LN2, BETA / 2 / 0.8),  # ((1 - eps) (-log sigma(beta h)) - eps (-log sigma(-beta h))) / (1 - 2 eps)
    "hinge": (1.0, BETA),  # max(0, 1 - beta h)
    "ipo": (25.0, None),  # (h_per_token - 1 / (2 beta))^2
    "ipo_sum": (25.0, 10.0),  # (h - 5)^2
    # q log(q / (1 - eps)) + (1 - q) log((1 - q) / eps) at q = sigma(beta h) = 1/2: 1/2 log(1/4 / (0.9 * 0.1));
    # its slope in beta h is q'(0) log(eps / (1 - eps)) = log(1/9) / 4
    "exo_pair": (0.5 * math.log(0.25 / 0.09), BETA * math.log(9) / 4),
    "nca_pair": (2 * LN2, BETA / 4),  # -log sigma(r+) - 1/2 log sigma(-r+) - 1/2 log sigma(-r-), r = beta log-ratio
    "bco_pair": (2 * LN2, BETA / 2),  # -log sigma(r+ - delta) - log sigma(-(r- - delta)), delta = mean reward = 0
    "sppo_hard": (50.0, 10.0),  # (log-ratio+ - 5)^2 + (log-ratio- + 5)^2
    "aot": (LN2, BETA / 2),  # sigmoid on sorted margins; all equal at step 0
    "aot_unpaired": (LN2, BETA / 2),
    "apo_zero": (1.0, BETA / 4),  # 1 - sigma(r+) + sigma(r-)
    "apo_down": (1.0, None),  # sigma(r+) + 1 - sigma(r+ - r-)
    # (1 - s(l / tau)) softplus(-l) + s(l / tau) e^-l, tau = 0.05, at l = 0: (ln 2 + 1) / 2; slope in l:
    # -1/4 - ln 2 / (4 tau) - 1/2 + 1 / (4 tau)
    "discopop": ((LN2 + 1) / 2, BETA * abs(-0.25 - 5 * LN2 - 0.5 + 5)),
    "sigmoid_norm": (LN2, None),
}


def step0_loss_by_hand(loss: str, batch: list[dict], under_x_prime) -> float:
    """The mean loss of step 1's pairs at step 0, where the policy's log-probs are the stored reference ones. The
    reference-free losses depend on them: simpo and sft from reference.jsonl, infonce and sami also on each
    response under x' (under_x_prime: pair -> (log pi(y+|x'), log pi(y-|x')))."""
    if loss in STEP0:
        return STEP0[loss][0]
    values = []
    for r in batch:
        chosen, rejected = r["ref_chosen_logps"], r["ref_rejected_logps"]
        if loss == "simpo":  # -log sigma(beta (mean log pi(y+) - mean log pi(y-)) - gamma), gamma 0.5
            values.append(softplus(-(BETA * (chosen / r["chosen_length"] - rejected / r["rejected_length"]) - 0.5)))
        elif loss == "sft":
            values.append(-chosen / r["chosen_length"])
        else:
            chosen_x_prime, rejected_x_prime = under_x_prime(r)
            # InfoNCE: for y+ tell x from x', for y- tell x' from x (a softmax over the two prompts); log-probs over
            # the temperature, 100 by default for infonce as in the official trainer, 1 for sami
            t = 100.0 if loss == "infonce" else 1.0
            columns = (softplus((chosen_x_prime - chosen) / t) + softplus((rejected - rejected_x_prime) / t)) / 2
            # SAMI adds the rows: under x tell y+ from y-, under x' tell y- from y+
            rows = (softplus(rejected - chosen) + softplus(chosen_x_prime - rejected_x_prime)) / 2
            values.append(columns if loss == "infonce" else (rows + columns) / 2)
    return sum(values) / len(values)


@pytest.mark.parametrize("loss", dpo_loss.LOSS_TYPES)
def test_every_loss_type_trains_from_its_step0_value(assets, baseline, tmp_path, loss):
    """--loss reaches the loss: the logged step-1 loss, computed before the first update, is the loss's own value
    at step 0. The gradient norm tells apart the losses that share a step-0 value: for a loss of the margin h
    alone, the step-0 gradient is dloss/dh times the gradient of h, so its norm is |dloss/dh| / (beta / 2) times
    sigmoid DPO's (the baseline, whose step 1 is the same batch)."""
    out = tmp_path / loss
    extra = ["--label-smoothing", "0.1"] if loss in ("robust", "exo_pair") else []
    train.main(args_for(assets, out, "--loss", loss, *extra))
    history = metrics(out)
    assert len(history) == 2 and all(math.isfinite(m["loss"]) for m in history)
    assert (out / "final" / "model.safetensors").exists()
    records = [json.loads(line) for line in (out / "reference.jsonl").read_text().splitlines()]
    batch = [records[i] for i in train.epoch_order(len(records), 0, 0)[:4]]  # step 1's pairs
    model, _ = load_model(assets["model"])

    def under_x_prime(r):  # x' + y scored alone: a plain forward, no packing
        with torch.no_grad():
            return tuple(alone_logps(model, r["negative_prompt_ids"], r[f"{key}_ids"])
                         for key in ("chosen", "rejected"))

    assert history[0]["step0/max_abs_logp_diff"] == 0
    assert history[0]["loss"] == pytest.approx(step0_loss_by_hand(loss, batch, under_x_prime), rel=1e-5, abs=1e-5)
    slope = STEP0.get(loss, (None, None))[1]
    if slope is not None:
        assert history[0]["grad_norm"] == pytest.approx(metrics(baseline)[0]["grad_norm"] * slope / (BETA / 2),
                                                        rel=1e-5)


def alone_logps(model, prompt: list[int], response: list[int]) -> float:
    logits = model(torch.tensor([prompt + response]))[0, len(prompt) - 1:-1]  # (len(response), V)
    return logits.float().log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).sum().item()


def test_bf16_autocast_run_and_held_out_meter(assets, tmp_path):
    out = tmp_path / "bf16"
    train.main(args_for(assets, out, "--dtype", "bfloat16", "--n-eval", "4"))
    first = metrics(out)[0]
    assert first["step0/ok"] and first["step0/max_abs_logp_diff"] == 0, first  # exact in bf16 too
    summary = json.loads((out / "summary.json").read_text())
    for side in ("base_eval", "trained_eval"):  # every fifth of the 16 prompts is held out: 3
        assert all(math.isfinite(summary[side][k]) for k in ("pmi", "pmi_self", "length", "truncated"))
        assert summary[side]["pairs"] == 3


def test_held_out_meter_scores_each_models_own_samples_under_the_base_model(assets, tmp_path):
    # MIPO's claim is about the base model's pointwise MI of the trained model's responses; the trained model's own
    # score of them (pmi_self) also rises when it merely grows more confident, so it is reported apart.
    out = tmp_path / "meter"
    args = args_for(assets, out, "--n-eval", "4", "--epochs", "3")
    train.main(args)
    summary = json.loads((out / "summary.json").read_text())
    cfg = config.resolve_config(config.train_parser().parse_args(args))[0]
    task = tasks.get_task(cfg.task)
    examples = tasks.load_examples(task, "eval", cfg.n_eval, cfg.data, cfg.eval_data)
    eval_pairs = pairs_file.read_pairs(out / "eval_pairs.jsonl")
    base, tokenizer = load_model(assets["model"])
    policy, _ = load_model(out / "final")
    prompts = [tokenizer.apply_chat_template(p["prompt"]) for p in eval_pairs]
    sampling = mipo.resolve_sampling(cfg.sampling, cfg.model)  # the same settings and seed: the meter's very samples
    own = mipo.sample_responses(policy, tokenizer, prompts, sampling, cfg.seed, 2 * cfg.sample_batch_size)
    assert own != held_out.chosen_responses(eval_pairs)
    before, after = summary["base_eval"], summary["trained_eval"]

    def rows(responses):  # x' drawn for the items alone (mipo.METER_SEED), whatever the run's --negative and --seed
        return mipo.meter_rows(task, examples, responses)

    base_meter = mipo.mi_meter(base, tokenizer, rows(held_out.chosen_responses(eval_pairs)))
    assert before["pmi"] == before["pmi_self"] == pytest.approx(base_meter["pmi"], abs=1e-5)
    under_base, under_policy = (mipo.mi_meter(scorer, tokenizer, rows(own)) for scorer in (base, policy))
    assert after["pmi"] == pytest.approx(under_base["pmi"], abs=1e-5)
    assert after["pmi_self"] == pytest.approx(under_policy["pmi"], abs=1e-5)
    assert abs(after["pmi"] - after["pmi_self"]) > 1e-3  # two scorers, two numbers
    assert (after["length"], after["truncated"]) == (under_base["length"], under_base["truncated"])

    # Beside each meter, the same token by token: one line per held-out answer, its pieces, its terms summing to its
    # pmi (the numbers summary.json holds), none of it in summary.json itself.
    for side, answers in (("base_eval", held_out.chosen_responses(eval_pairs)), ("trained_eval", own)):
        lines = read_jsonl(out / f"{side}.tokens.jsonl")
        assert [r["id"] for r in lines] == [item["id"] for item in summary[side]["items"]] == [ex.id for ex in examples]
        assert "per_token" not in summary[side]
        terms = mipo.pointwise_mi(base, tokenizer, rows(answers))[2]
        for line, item, (x, _, text, stopped), (ids, pmi_tokens) in zip(lines, summary[side]["items"], rows(answers),
                                                                         terms):
            assert ids == mipo.encode_turn(tokenizer, x, text, stopped)[1]
            assert line["pmi"] == item["metrics"]["pmi"] and line["length"] == len(ids) == len(line["pmi_tokens"])
            assert line["stopped"] == stopped and "".join(line["tokens"]) == tokenizer.decode(ids, False)
            assert line["pmi_tokens"] == pytest.approx(pmi_tokens, abs=1e-5)
            assert math.fsum(line["pmi_tokens"]) == pytest.approx(line["pmi"], abs=1e-4)  # float32 sums of tens of nats


def drawn_panels(monkeypatch) -> list:
    """What report.plot_training_curves draws, as it saves each figure: (file, {panel title: each line's y})."""
    drawn, save = [], report.save_figure

    def keep(fig, out_png):
        drawn.append((out_png, {ax.get_title(): [line.get_ydata().tolist() for line in ax.lines] for ax in fig.axes
                                if ax.get_title()}))
        save(fig, out_png)

    monkeypatch.setattr(report, "save_figure", keep)
    return drawn


def test_train_py_draws_the_training_curves_where_the_run_ends(assets, tmp_path, monkeypatch, capsys):
    # eval.py's curves, from the same function: every panel the step's metrics, the meter before and after.
    drawn = drawn_panels(monkeypatch)
    out = tmp_path / "curves"
    train.main(args_for(assets, out, "--n-eval", "4"))
    assert f"curves: {out / 'curves.png'}" in capsys.readouterr().out
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ((path, panels),) = drawn
    history, summary = metrics(out), json.loads((out / "summary.json").read_text())
    assert path == out / "curves.png"
    for title, keys in report.CURVE_PANELS:
        assert panels[title] == [[m[key] for m in history] for key in keys], title
    assert {"gradient norm (before clipping)", "learning rate"} <= set(panels)
    assert panels["MI meter (nats)"] == [[summary["base_eval"]["pmi"], summary["trained_eval"]["pmi"]]]


def test_without_matplotlib_train_py_says_so_in_one_line_and_writes_the_rest(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setattr(report, "_warned_no_matplotlib", [])
    out = tmp_path / "no-plots"
    train.main(args_for(assets, out, "--n-eval", "4"))
    captured = capsys.readouterr()
    notices = [line for line in captured.err.splitlines() if "matplotlib" in line]
    assert notices == ["plots skipped: matplotlib is not installed (pip install matplotlib); everything else is "
                       "written"]
    assert "curves:" not in captured.out and not (out / "curves.png").exists()
    for name in ("summary.json", "pmi.html", "trained_eval.tokens.jsonl", "final/model.safetensors"):
        assert (out / name).is_file(), name


def test_train_and_eval_meter_the_same_items_alike(assets, tmp_path):
    # One meter: train.py's held-out meter (mipo.held_out_meter) and eval.py's pmi (meter_all) on the same items and
    # responses draw the same x' and give the same numbers, whatever --negative and --seed the run used.
    import eval as evaluation
    from bookkeeping import results

    task = tasks.get_task("jsonl")
    examples = tasks.load_examples(task, "eval", 4, assets["data"])
    model, tokenizer = load_model(assets["model"])
    prompts = [tokenizer.apply_chat_template(tasks.prompt_messages(task, ex)) for ex in examples]
    sampling = mipo.resolve_sampling(replace(tasks.default_sampling(task, "cpu"), max_new_tokens=8), model)
    responses = mipo.sample_responses(model, tokenizer, prompts, sampling, seed=3, batch_size=4)
    held = mipo.held_out_meter(model, tokenizer, task, examples, responses)
    items = [{"id": ex.id, "response": text, "stopped": stopped, "metrics": {}}
             for ex, (text, stopped) in zip(examples, responses)]
    spec = {"name": "m", "eval_dir": tmp_path / "eval"}
    results.save_results(spec["eval_dir"], task, items, {})
    args = SimpleNamespace(no_mi=False, mi_reference={"name": "base", "model": str(assets["model"])}, device="cpu",
                           torch_dtype=torch.float32, batch_size=4, compile=False)
    evaluation.meter_all([(spec, items)], task, examples, args)
    assert [it["metrics"]["pmi"] for it in items] == [row["metrics"]["pmi"] for row in held["items"]]
    assert held["pmi"] == pytest.approx(sum(it["metrics"]["pmi"] for it in items) / len(items), abs=1e-6)
    # the x' does not depend on a run's seed or kind of negative: the same rows for any run
    rows = mipo.meter_rows(task, examples, responses)
    assert [r[1] for r in rows] == [tasks.prompt_messages(task, x) for x, _, _ in
                                    mipo.plan_negatives(task, examples, task.negative, mipo.METER_SEED)]


def test_mipo_py_and_train_py_sample_the_same_pairs_for_the_same_seed(assets, baseline, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = subprocess.run([sys.executable, str(REPO / "mipo.py"), "--model", str(assets["model"]), "--task", "jsonl",
                             "--data", str(assets["data"]), "--negative", "random-resample", "--n", "8",
                             "--max-new-tokens", "6", "--temperature", "1.0", "--batch-size", "2", "--dtype", "float32",
                             "--device", "cpu", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == (baseline / "pairs.jsonl").read_bytes()
    # and by default: the same prompts per generate call (each batch has its own seed) and the same dtype rule
    assert (mipo.pairs_parser().parse_args([]).batch_size
            == config.train_parser().parse_args([]).sample_batch_size == 16)
    assert (mipo.pairs_parser().parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
            and config.train_parser().parse_args([]).dtype == "auto")


def test_truncated_pairs_are_reported_and_dropped_on_request(assets, tmp_path):
    # The tiny model with 60 of its 211 tokens ending a turn: some of its 6-token responses stop by themselves (8 of 12
    # pairs have both sides complete), the others are cut.
    model = tmp_path / "stops-often"
    shutil.copytree(assets["model"], model)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [209, 210, *range(1, 60)]}))
    out = tmp_path / "dropped"
    result = run_cli([*args_for(assets, out, "--drop-truncated", n=12), "--model", str(model)])
    assert result.returncode == 0, result.stderr
    pairs = pairs_file.read_pairs(out / "pairs.jsonl")
    complete = [p["id"] for p in pairs if p["chosen_stopped"] and p["rejected_stopped"]]
    assert 4 <= len(complete) < len(pairs)  # some responses cut, some not
    reference = [json.loads(line)["id"] for line in (out / "reference.jsonl").read_text().splitlines()]
    assert sorted(reference) == sorted(complete)  # only the pairs with both responses complete are trained on
    stats = json.loads((out / "summary.json").read_text())["pairs"]
    assert stats == {"pairs": 12, "chosen_truncated": sum(not p["chosen_stopped"] for p in pairs) / 12,
                     "rejected_truncated": sum(not p["rejected_stopped"] for p in pairs) / 12,
                     "either_truncated": (12 - len(complete)) / 12, "trained_on": len(complete)}
    assert "pairs with a response cut at that limit: dropped (--drop-truncated)" in result.stdout
    assert f"pairs: 12; cut at 6 new tokens: chosen {stats['chosen_truncated']:.0%}" in result.stdout


# ---------------------------------------------------------------------------------------------------- resuming


RESUME_ARGS = ("--epochs", "2", "--save-every", "2", "--micro-batch-size", "2")


@pytest.fixture(scope="session")
def uninterrupted(assets):
    """The resume tests' command, uninterrupted, in a process of its own (the thread count changes float rounding)."""
    return completed_run(assets, "uninterrupted", *RESUME_ARGS)[0]


@pytest.mark.parametrize("kind", ["KILL", "INT"])
@pytest.mark.parametrize("crash_at", ["pairs:2", "reference:1", "train:3"])
def test_killed_run_resumes_to_identical_weights(assets, uninterrupted, tmp_path, crash_at, kind):
    """SIGKILL (a power cut, the OOM killer) or SIGINT (Ctrl-C) in each stage, then the same command: the weights of
    an uninterrupted run, bit for bit. Ctrl-C ends with one line and status 130, no traceback. And it resumed,
    which every fixed seed would hide from the weights alone: the files of the finished stages are untouched, the
    work kept in the unfinished one is used, not redone, and the run says at which step it resumes."""
    model = copy_model(assets, tmp_path / "model")  # this run's own copy of the base model, changed below
    out = tmp_path / "resumed"
    args = args_for(assets, out, *RESUME_ARGS, model=model)
    killed = run_cli([*args, "--_crash-at", crash_at + (":INT" if kind == "INT" else "")])
    if kind == "KILL":
        assert killed.returncode == -9, killed.stderr[-2000:]  # nothing was cleaned up
    else:
        assert killed.returncode == 130, killed.stderr[-2000:]
        assert killed.stderr.strip().splitlines()[-1] == "interrupted; run the same command to resume"
        assert "Traceback" not in killed.stderr
    assert not (out / "final").exists() and not list(out.rglob("*.tmp"))  # no half-written file
    if crash_at == "train:3":
        kept = file_identity(out, ["config.json", "pairs.jsonl", "reference.jsonl"])
        # The steps the checkpoint holds (1 and 2 from --save-every 2; 1 to 3 after Ctrl-C, which lets step 3 end
        # and saves it) are the only ones that read the base weights: a run that started over would train from
        # these changed weights, and could not end with the uninterrupted weights.
        perturb_weights(model)
    elif crash_at == "reference:1":
        # after the first micro-batch of the reference pass, which stays in its partial file
        kept = file_identity(out, ["config.json", "pairs.jsonl"])
        partial = out / "reference.rank0-of-1.partial.jsonl"
        scored = [{**json.loads(line), "kept": True} for line in partial.read_text().splitlines()]
        assert len(scored) == 2  # one micro-batch
        partial.write_text("".join(json.dumps(r) + "\n" for r in scored))  # a mark a rescoring would not write
    else:  # after 2 of the 4 batches of prompts were sampled, which stay in the samples file
        kept = file_identity(out, ["config.json"])
        assert len((out / "pairs.samples.jsonl").read_text().splitlines()) == 4 and not (out / "pairs.jsonl").exists()
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert file_identity(out, kept) == kept
    if crash_at == "train:3":
        done = 3 if kind == "INT" else 2
        assert f"resuming from {out / 'checkpoint.pt'}: {done} optimizer step(s) done, training continues at step " \
               f"{done + 1}" in resumed.stdout
    elif crash_at == "reference:1":
        reference = {r["id"]: r for r in map(json.loads, (out / "reference.jsonl").read_text().splitlines())}
        assert all(reference[r["id"]].get("kept") for r in scored)
        assert sum(r.get("kept", False) for r in reference.values()) == 2
        assert "resuming from" not in resumed.stdout  # no checkpoint was written before the kill
    else:
        assert "pairs: 6/8 prompts sampled (batch 1/2)" in resumed.stderr  # only the last 2 batches sampled
    a, b = final_weights(out), final_weights(uninterrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize("how", ["clock", "TERM"])
def test_checkpoints_by_the_clock_and_on_sigterm(assets, uninterrupted, tmp_path, how):
    """Without --save-every a checkpoint is written by the clock (--save-minutes) and on a stop signal. A kill in
    step 3 with a checkpoint due after every step resumes from step 2's; SIGTERM in step 1, with the 10-minute
    clock far off, lets the step end, saves it and exits with status 143. Both end with the uninterrupted
    weights, bit for bit."""
    out = tmp_path / how
    args = args_for(assets, out, "--epochs", "2", "--micro-batch-size", "2",
                    *(["--save-minutes", "1e-6"] if how == "clock" else []))
    killed = run_cli([*args, "--_crash-at", "train:3" if how == "clock" else "train:1:TERM"])
    if how == "clock":
        assert killed.returncode == -9, killed.stderr[-2000:]
    else:
        assert killed.returncode == 143, killed.stderr[-2000:]
        assert killed.stderr.strip().splitlines()[-1] == "terminated; run the same command to resume"
        assert "Traceback" not in killed.stderr
    done = 2 if how == "clock" else 1
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint.pt'}: {done} optimizer step(s) done" in resumed.stdout
    a, b = final_weights(out), final_weights(uninterrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


def test_samples_file_cut_mid_line_is_repaired_on_resume(assets, uninterrupted, tmp_path):
    """A kill in the middle of writing a line of the samples file leaves half a line: the rerun cuts it off, samples
    that prompt's batch again and ends with the very pairs of an uninterrupted run."""
    out = tmp_path / "cut"
    args = args_for(assets, out, *RESUME_ARGS)
    assert run_cli([*args, "--_crash-at", "pairs:3"]).returncode == -9
    samples = out / "pairs.samples.jsonl"
    assert len(samples.read_text().splitlines()) == 6
    samples.write_bytes(samples.read_bytes()[:-40])  # the sixth line cut in its middle
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "pairs: 6/8 prompts sampled (batch 1/2)" in resumed.stderr  # the cut line's batch again, then the last
    assert (out / "pairs.jsonl").read_bytes() == (uninterrupted / "pairs.jsonl").read_bytes()


def test_a_full_disk_keeps_the_previous_checkpoint_and_final_model(tmp_path, monkeypatch):
    """A write that fails half-way (No space left on device) leaves the previous checkpoint.pt and final/ complete and
    loadable, no temporary behind, and says so in one line."""
    model, tokenizer = load_model(write_tiny_model(tmp_path / "tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = tmp_path / "run"
    run.mkdir()
    runs.save_checkpoint(run / "checkpoint.pt", model, optimizer, 2)
    save_model(model, tokenizer, run / "final")
    before = {p.name: p.read_bytes() for p in [run / "checkpoint.pt", *(run / "final").iterdir()]}

    def half_then_full(_, f, *args, **kwargs):  # what a disk filling up mid-write does
        (f if hasattr(f, "write") else open(f, "wb")).write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", half_then_full)
    monkeypatch.setattr(model_loader, "save_file", half_then_full)
    with pytest.raises(MipoError) as error:
        runs.save_checkpoint(run / "checkpoint.pt", model, optimizer, 4)
    assert str(error.value) == (f"{run / 'checkpoint.pt'}: could not write (No space left on device); "
                                "the previous checkpoint is kept")
    with pytest.raises(MipoError) as error:
        save_model(model, tokenizer, run / "final")
    assert str(error.value) == (f"{run / 'final'}: could not write (No space left on device); "
                                f"{run / 'final'} is as it was before")
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "final"]  # no .tmp left
    assert {p.name: p.read_bytes() for p in [run / "checkpoint.pt", *(run / "final").iterdir()]} == before
    fresh = make_tiny_model("llama", seed=3, vocab_size=VOCAB, max_position_embeddings=512)
    assert runs.load_checkpoint(run / "checkpoint.pt", fresh, torch.optim.AdamW(fresh.parameters())) == 2
    load_model(run / "final")


def test_checkpoint_holds_no_pickled_object_and_restores_every_generator(tmp_path):
    """checkpoint.pt holds tensors, numbers and lists only (torch.load with weights_only=True reads it), and loading
    it gives back the weights, AdamW's moments, the step and every random generator's state."""
    import random

    import numpy as np

    model = make_tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logsumexp(-1).sum().backward()
    optimizer.step()
    torch.manual_seed(5), random.seed(6), np.random.seed(7)
    np.random.standard_normal()  # numpy caches the second of each pair of Gaussians: part of its state
    runs.save_checkpoint(tmp_path / "checkpoint.pt", model, optimizer, 3)
    draws = (torch.rand(3).tolist(), random.random(), np.random.standard_normal(2).tolist())
    json.dumps(runs.rng_state())  # the generators' states are plain JSON
    fresh = make_tiny_model(seed=1)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert runs.load_checkpoint(tmp_path / "checkpoint.pt", fresh, fresh_optimizer) == 3
    assert (torch.rand(3).tolist(), random.random(), np.random.standard_normal(2).tolist()) == draws
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    moments = lambda opt: [s["exp_avg_sq"] for s in opt.state_dict()["state"].values()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(moments(fresh_optimizer), moments(optimizer)))
    assert set(torch.load(tmp_path / "checkpoint.pt", weights_only=True)) == {"step", "model", "optimizer", "rng"}


def test_a_crafted_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "model": RunsCodeWhenUnpickled(marker)}, tmp_path / "checkpoint.pt")
    model = make_tiny_model()
    with pytest.raises(MipoError, match="checkpoint.pt: not a checkpoint this version of train.py wrote"):
        runs.load_checkpoint(tmp_path / "checkpoint.pt", model, torch.optim.AdamW(model.parameters()))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- processes


def test_two_process_ddp_equals_one_process(assets, baseline, tmp_path):
    """Two ranks sample every other batch of prompts, score the pairs each will train on, and train with a
    micro-batch of 2 each: the same pairs and the same weights as one process."""
    out = tmp_path / "ddp"
    args = args_for(assets, out, "--epochs", "2", "--save-every", "2", "--micro-batch-size", "2")
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    result = run_cli(args, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "pairs.jsonl").read_text() == (baseline / "pairs.jsonl").read_text()
    assert not list(out.glob("pairs.rank*"))
    assert_same_update(final_weights(out), final_weights(baseline), assets)
    assert_same_metrics(out, baseline)
    assert metrics(out)[0]["step0/max_abs_logp_diff"] == 0


def test_two_process_fsdp_equals_one_process_and_resumes(assets, baseline, tmp_path):
    """train.py --shard (FSDP2 over 2 gloo processes, transforms/shard.py) gives the single-process weights and logs its
    numbers, and a sharded run killed mid-training resumes from its distributed checkpoint (not from the start: the
    base weights are changed after the kill) to the same weights as an uninterrupted one."""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    args = lambda out, model, pairs: args_for(assets, out, "--epochs", "2", "--save-every", "2", "--micro-batch-size",
                                              "2", "--pairs", str(pairs), "--shard", model=model)
    result = run_cli(args(tmp_path / "fsdp", assets["model"], baseline / "pairs.jsonl"), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    fsdp = final_weights(tmp_path / "fsdp")
    assert_same_update(fsdp, final_weights(baseline), assets)
    assert_same_metrics(tmp_path / "fsdp", baseline)
    assert metrics(tmp_path / "fsdp")[0]["step0/max_abs_logp_diff"] == 0

    model, out = copy_model(assets, tmp_path / "model"), tmp_path / "resumed"
    pairs = tmp_path / "pairs.jsonl"  # the baseline's pairs, marked as sampled by the copy
    pairs.write_text((baseline / "pairs.jsonl").read_text().replace(json.dumps(str(assets["model"])),
                                                                    json.dumps(str(model))))
    killed = run_cli([*args(out, model, pairs), "--_crash-at", "train:3"], launcher=launcher)
    assert killed.returncode != 0 and (out / "checkpoint" / "extra.json").is_file()
    kept = file_identity(out, ["config.json", "reference.jsonl"])
    perturb_weights(model)  # only steps 1 and 2, which the checkpoint holds, start from the base weights
    resumed = run_cli(args(out, model, pairs), launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert file_identity(out, kept) == kept
    assert (f"resuming from {out / 'checkpoint'}: 2 optimizer step(s) done, training continues at step 3"
            in resumed.stdout)
    resumed = final_weights(out)
    assert all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_flags_and_inputs_give_one_line_and_status_2(assets, baseline, tmp_path):
    other_pairs = tmp_path / "other-model-pairs.jsonl"
    other_pairs.write_text((baseline / "pairs.jsonl").read_text().replace(json.dumps(str(assets["model"])), '"qwen"'))
    cases = {
        "--loss": (["--loss", "dpo_v2"], "invalid choice: 'dpo_v2'"),
        "--beta": (["--beta", "0"], "--beta 0.0: must be > 0"),
        "run directory": (["--lr", "2e-3", "--out", str(baseline)], "holds a run with optim.lr = 0.001"),
        "pairs model": (["--pairs", str(other_pairs)], "was sampled by model 'qwen'"),
    }
    for what, (extra, message) in cases.items():
        result = run_cli([*args_for(assets, tmp_path / "bad"), *extra])
        assert result.returncode == 2, (what, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (what, lines)


def test_hub_model_name_trains_from_the_downloaded_directory(assets, baseline, tmp_path, monkeypatch):
    """--model owner/name --revision R: huggingface_hub's snapshot_download (faked here: it returns the tiny model's
    directory) fetches the model, and the run is the run on that directory: the same pairs, the same weights."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def snapshot_download(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision))
        return str(assets["model"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    out = tmp_path / "hub"
    argv = args_for(assets, out, "--epochs", "2", "--save-every", "2", "--revision", "0123abc")
    argv[argv.index("--model") + 1] = "someone/tiny-chat"
    train.main(argv)
    assert calls and set(calls) == {("someone/tiny-chat", "0123abc")}
    assert (out / "pairs.jsonl").read_text() == (baseline / "pairs.jsonl").read_text()  # sampled by the same directory
    a, b = final_weights(out), final_weights(baseline)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("script", ["train.py", "mipo.py", "eval.py"])
def test_unreachable_hub_model_is_one_line_and_writes_nothing(assets, tmp_path, script):
    """Where the hub cannot be reached (the real huggingface_hub told not to connect, with an empty cache), each
    command line says so in one line with the local-directory way, exits 2 and leaves the file system as it was."""
    pytest.importorskip("huggingface_hub")
    work = tmp_path / "work"
    work.mkdir()
    data = assets["data"]
    argv = {"train.py": ["--model", "Qwen/Qwen2.5-1.5B-Instruct", "--revision", "0123abc", "--task", "jsonl", "--data",
                         str(data), "--out", str(work / "run")],
            "mipo.py": ["--model", "Qwen/Qwen2.5-1.5B-Instruct", "--revision", "0123abc", "--task", "jsonl", "--data",
                        str(data), "--out", str(work / "pairs.jsonl")],
            "eval.py": ["--model", "Qwen/Qwen2.5-1.5B-Instruct", "--revision", "0123abc", "--task", "jsonl", "--data",
                        str(data), "--out", str(work / "eval"), "--judge", "none"]}[script]
    listing = lambda: sorted(p for p in REPO.rglob("*")  # noqa: E731
                             if not {".git", "__pycache__", ".pytest_cache"} & set(p.parts))
    before = listing()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True, text=True, cwd=work,
                            env=env, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: --model Qwen/Qwen2.5-1.5B-Instruct: not a local directory, and the Hugging Face "
                           "hub cannot be reached") and "pass --model DIR" in line
    assert list(work.iterdir()) == []
    assert listing() == before


def test_infonce_needs_the_negative_prompt(assets, baseline, tmp_path):
    pairs = [json.loads(line) for line in (baseline / "pairs.jsonl").read_text().splitlines()]
    for p in pairs:
        p["negative_prompt"] = None
    path = tmp_path / "no-x-prime.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with pytest.raises(MipoError, match="no 'negative_prompt'"):
        train.main(args_for(assets, tmp_path / "run", "--loss", "infonce", "--pairs", str(path)))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    out = tmp_path / "nan"
    args = args_for(assets, out, "--epochs", "2", "--save-every", "2")
    assert run_cli([*args, "--_crash-at", "train:3"]).returncode == -9
    checkpoint = (out / "checkpoint.pt").read_bytes()
    # Corrupt what the next steps read: a NaN reference log-prob makes every later loss NaN.
    records = [json.loads(line) for line in (out / "reference.jsonl").read_text().splitlines()]
    for r in records:
        r["ref_chosen_logps"] = float("nan")
    (out / "reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_cli(args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: step 3: the loss is nan") and "checkpoint.pt (step 2)" in lines[-1]
    assert (out / "checkpoint.pt").read_bytes() == checkpoint and not (out / "final").exists()
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_presets_and_flags_resolve_in_one_place():
    pairs, loss, opt, hw, out = config.resolve_config(
        config.train_parser().parse_args(["--preset", "paper", "--device", "cpu"]))
    assert (opt.lr, opt.batch_size, opt.betas, opt.weight_decay, opt.warmup_ratio, opt.min_lr_ratio, opt.grad_clip,
            opt.epochs, loss.beta, loss.loss) == (5e-7, 4, (0.9, 0.95), 0.0, 0.03, 0.1, 1.0, 1, 0.1, "sigmoid")
    assert pairs.n is None and pairs.sampling == tasks.TASKS["persona"].paper and pairs.negative == "incomplete"
    pairs, loss, opt, hw, out = config.resolve_config(
        config.train_parser().parse_args(["--device", "cpu", "--lr", "3e-6", "--max-new-tokens", "32"]))
    assert pairs.n == config.PRESETS["cpu"]["n"] and opt.lr == 3e-6 and pairs.sampling.max_new_tokens == 32
    assert str(out) == "runs/qwen-persona-incomplete-sigmoid"


def test_memory_plan_counts_the_longest_training_prompt(assets, baseline, tmp_path, capsys):
    """The printed plan sizes a row as the longest prompt the run trains on (as the reference pass stored it) plus
    a response (a GPU's two causal rows per pair), from the task's prompts and from a --pairs file alike; not a
    fixed 512-token prompt."""
    stored = map(json.loads, (baseline / "reference.jsonl").read_text().splitlines())
    longest = max(len(r["prompt_ids"]) for r in stored)
    for extra in ((), ("--pairs", str(baseline / "pairs.jsonl"))):
        args = config.train_parser().parse_args(args_for(assets, tmp_path, *extra))
        config.print_plan(*config.resolve_config(args), 1)
        assert f"pair(s), rows of {longest + 6} tokens" in capsys.readouterr().out


def test_the_plan_names_the_cpu_speedups_and_one_switch_turns_them_all_off(assets, tmp_path, capsys, monkeypatch):
    args = config.train_parser().parse_args(args_for(assets, tmp_path))
    config.print_plan(*config.resolve_config(args), 1)
    assert f"CPU speed-ups: {', '.join(cpu_speedups.in_force('cpu'))} (MIPO_CPU_SPEEDUPS=0" in capsys.readouterr().out
    assert "oneDNN linear layers" in cpu_speedups.in_force("cpu") and not cpu_speedups.in_force("cuda")
    monkeypatch.setenv("MIPO_CPU_SPEEDUPS", "0")
    config.print_plan(*config.resolve_config(args), 1)
    assert "CPU speed-ups: none" in capsys.readouterr().out and not cpu_speedups.in_force("cpu")
    for parser in (config.train_parser(), config.eval_parser(), mipo.pairs_parser()):  # named in every --help
        assert "MIPO_CPU_SPEEDUPS=0" in " ".join(parser.format_help().split())


def test_the_step0_check_is_printed_once(assets, tmp_path, capsys):
    train.main(args_for(assets, tmp_path / "once"))
    assert capsys.readouterr().out.count("step-0 check") == 1


def test_paper_preset_fits_the_micro_batch_and_checkpointing_to_the_gpu(tmp_path):
    """--preset paper on a GPU (flags left out): config.fit_to_gpu picks what shard.choose_layout picks, keeps the
    global batch, and only turns gradient checkpointing on where the model needs it."""
    def fit(name, gpu_gib, world=1, sharded=False):
        model_dir = tmp_path / name
        model_dir.mkdir(exist_ok=True)
        (model_dir / "config.json").write_text(json.dumps(shard.PAPER_MODELS[name]))
        opt, hw = config.OptimConfig(micro_batch_size=4), config.HardwareConfig(dtype="bfloat16", shard=sharded)
        return config.fit_to_gpu(str(model_dir), 512, 512, opt, hw, world, gpu_gib * 2**30)

    opt, hw = fit("qwen2.5-0.5b", 80)
    assert (opt.batch_size, opt.micro_batch_size, hw.gradient_checkpointing) == (4, 4, False)
    opt, hw = fit("qwen2.5-3b", 80)
    assert opt.batch_size == 4 and (opt.micro_batch_size < 4 or hw.gradient_checkpointing)
    opt, hw = fit("qwen2.5-7b", 80, world=4, sharded=True)
    assert opt.batch_size == 4 and opt.micro_batch_size == 1 and hw.shard
    with pytest.raises(MipoError, match="add --shard or more GPUs"):
        fit("qwen2.5-7b", 80)


def test_learning_rate_schedule_is_transformers_cosine_with_min_lr_step_for_step():
    # The paper's code (OpenRLHF) takes transformers' get_cosine_with_min_lr_schedule_with_warmup with ceil(3%) of
    # the steps as warmup and min_lr = 0.1 x lr; its value at step 0 is 0 whenever there is any warmup.
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    cfg = config.OptimConfig(lr=5e-7)
    for total in (1, 2, 16, 33, 34, 100, 1119, 3410):
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([param], lr=cfg.lr)
        schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, math.ceil(0.03 * total), total,
                                                               min_lr_rate=cfg.min_lr_ratio)
        expected = []
        for _ in range(total):
            expected.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        ours = [train.learning_rate(step, total, cfg) for step in range(total)]
        assert ours == pytest.approx(expected, rel=1e-12, abs=0), total
    assert train.learning_rate(0, 16, cfg) == 0.0 and train.learning_rate(1, 16, cfg) == 5e-7  # 1 warmup step of 16


def test_each_stage_frees_its_model_before_the_next_loads(assets, tmp_path, monkeypatch):
    """Sampling, training and the held-out meter each load a model: when one loads, the ones before it are gone
    (no wait for the cycle collector), so that a GPU holds one model at a time, as the memory plan counts."""
    import weakref

    loaded = []

    def load(*args, **kwargs):
        alive = [name for name, ref in loaded if ref() is not None]
        assert not alive, f"{alive} still in memory when the next model loads"
        model, tokenizer = load_model(*args, **kwargs)
        loaded.append((str(args[0]), weakref.ref(model)))
        return model, tokenizer

    for module in (train, held_out):
        monkeypatch.setattr(module, "load_model", load)
    gc_was = gc.isenabled()
    gc.disable()  # the collector would free cycles at a time of its own choosing: the stages must not rely on it
    try:  # --compile: the compiled decode step's graph holds the model in a cycle
        train.main(args_for(assets, tmp_path / "compiled", "--n-eval", "4", "--compile"))
    finally:
        if gc_was:
            gc.enable()
    assert len(loaded) == 4  # sampling, training, the trained model's samples, the base model's meter
    train.main(args_for(assets, tmp_path / "eager", "--n-eval", "4"))
    for name in ("pairs.jsonl", "eval_pairs.jsonl"):  # the compiled decode step samples what the eager one does
        responses = [[(p["chosen"], p["rejected"]) for p in pairs_file.read_pairs(tmp_path / run / name)]
                     for run in ("compiled", "eager")]
        assert responses[0] == responses[1]
