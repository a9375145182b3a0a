"""A training run's machinery, which a reader of the method can skip: the checks made before anything is written,
the processes under torchrun, the run directory's settings, checkpoints (tensors only, no pickle) and
random-generator states, glibc's memory settings, and the crash hook the resume tests use.
"""
import json
import os
import random
import signal
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import mipo
from plumbing import shard
from plumbing.config import OptimConfig, PairsConfig
from plumbing.files import Interrupted, MipoError, atomic_file, check_out, write_atomically
from model_loader import check_model
from sampler import set_glibc_malloc
from tasks import get_task, load_examples

# The layout of a run directory: train.py writes it, eval.py and plumbing/report.py read it.
RUN_FINAL = "final"  # the trained policy, a Hugging Face model directory
RUN_METRICS = "metrics.jsonl"  # one JSON dict per optimizer step (loss, rewards/*, logps/*, ...)
RUN_CONFIG = "config.json"  # the run's settings; eval reads pairs.task and pairs.data from it
RUN_SUMMARY = "summary.json"  # base_eval / trained_eval: train.py's held-out MI meter before and after
EVAL_SUBDIR = "eval"  # RUN/eval/TASK.jsonl, TASK.summary.json, compare-TASK.md/.png, curves.png
OTHER_MODELS_DIR = Path("runs/eval")  # results of a bundled model or a plain model directory: runs/eval/NAME

# Settings that may change between a run and its resumption: they change how the work is done, not the result.
MAY_CHANGE = {"hardware.device", "hardware.gradient_checkpointing", "hardware.save_every", "hardware.save_minutes"}


# ---------------------------------------------------------------------------------------------------------------
# Processes: one, or several under torchrun. Rank 0 writes the shared files; every rank trains.
# ---------------------------------------------------------------------------------------------------------------


def init_distributed(device: str):
    """(rank, world_size, device) from torchrun's environment; a plain `python train.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    # Generous timeout: ranks wait at barriers while rank 0 alone writes files or measures the held-out meter.
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=6))
    return rank, world, device


def barrier(world: int):
    if world > 1:
        dist.barrier()


def rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_inputs(pairs: PairsConfig, opt: OptimConfig, out: Path, settings: dict):
    """Everything a run reads, checked before its directory is created, so that a refused run leaves the file system
    as it was: --out and its saved settings, the model (config.json, tokenizer, tensor shapes from the safetensors
    headers), the pairs file or the task's prompts, and that they fill at least one batch."""
    check_run_dir(out, settings)
    check_model(pairs.model)
    task = get_task(pairs.task)
    if pairs.pairs_file:
        n = len(read_pairs_file(Path(pairs.pairs_file), pairs))
    else:
        n = len(load_examples(task, "train", pairs.n, pairs.data, pairs.eval_data))
    if pairs.n_eval > 0:
        load_examples(task, "eval", pairs.n_eval, pairs.data, pairs.eval_data)
    if n < opt.batch_size:
        raise MipoError(f"{n} training pairs are fewer than one batch of --batch-size {opt.batch_size}; raise --n or "
                        "lower --batch-size")


def check_run_dir(out: Path, settings: dict):
    """config.json holds the settings of the run in this directory; a different result-changing setting means
    another run, and mixing two runs' files would silently train on the wrong data. Reads only."""
    check_out(out, is_dir=True)
    path = out / RUN_CONFIG
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MipoError(f"{path}: not valid JSON; delete the run directory or pass another --out")
    for section, values in settings.items():
        for key, value in values.items():
            if f"{section}.{key}" in MAY_CHANGE:
                continue
            before = old.get(section, {}).get(key, "(not set)") if isinstance(old, dict) else "(not set)"
            if json.loads(json.dumps(value)) != before:
                raise MipoError(f"{path}: this run directory holds a run with {section}.{key} = {before!r}, this command "
                                f"asks for {value!r}; pass another --out, or the same settings to resume it")


def start_run_dir(out: Path, settings: dict):
    """The run directory and its config.json, once check_inputs has passed (a resumed run keeps its own)."""
    if not (out / RUN_CONFIG).exists():
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / RUN_CONFIG, json.dumps(settings, indent=2) + "\n")


def read_pairs_file(path: Path, cfg: PairsConfig) -> list[dict]:
    """--pairs FILE: pairs sampled earlier. They must come from the model being trained: DPO's reference is that
    model, and MIPO's pairs are its own samples."""
    pairs = mipo.read_pairs(path)
    for pair in pairs:
        sampled_by = str(pair["sampling"].get("model", "")) if isinstance(pair["sampling"], dict) else ""
        if not same_model(sampled_by, cfg.model):
            raise MipoError(f"{path}: pair {pair['id']!r} was sampled by model {sampled_by!r}, not --model {cfg.model}; "
                            "sample pairs with this model (leave out --pairs) or pass the model that sampled them")
        if pair["task"] != cfg.task:
            raise MipoError(f"{path}: pair {pair['id']!r} is from task {pair['task']!r}, not --task {cfg.task}")
    if not pairs:
        raise MipoError(f"{path}: no pairs in the file (--pairs)")
    return pairs[:cfg.n] if cfg.n else pairs


def same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()


def keep_activations_in_the_heap():
    """glibc serves a block above its mmap threshold (128 KiB, raised as such blocks are freed, up to 32 MiB) by a
    fresh mapping, whose pages fault in again at each use: every activation buffer of a DPO step (megabytes each)
    paid thousands of page faults per step. Blocks up to 64 MiB come from the heap instead, which is trimmed only
    when more than 8 MiB are free at its top: faster steps for a little more peak memory (docs/performance.md).
    Larger blocks still get mappings of their own. Set when DPO starts, after sampling's own (sampler.keep_freed_memory_for_reuse). Elsewhere than
    glibc it does nothing."""
    set_glibc_malloc(mmap_threshold=64 << 20, trim_threshold=8 << 20)


def crash_hook(crash_at: str | None, stage: str, count: int):
    # Test hook (--_crash-at STAGE:K): SIGKILL this process after the K-th unit of work of a stage, which is
    # what a power cut or the OOM killer does; STAGE:K:INT sends SIGINT instead, which is what Ctrl-C does, and
    # STAGE:K:TERM SIGTERM, what a scheduler sends to preempt a job. The resume tests rerun the command and
    # compare final weights.
    if crash_at and crash_at.split(":")[:2] == [stage, str(count)]:
        how = crash_at.split(":")[2] if crash_at.count(":") == 2 else "KILL"
        os.kill(os.getpid(), {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "KILL": signal.SIGKILL}[how])


class StopRequest:
    """During DPO, Ctrl-C (SIGINT) and SIGTERM do not cut the step in flight: they set `signum`, and the loop writes
    a checkpoint after that step and stops (files.Interrupted). A second signal interrupts at once; the last
    checkpoint stays, as every file is written atomically."""

    def __enter__(self):
        self.signum = None
        # A signal ignored by whoever started the process (nohup, a shell's background job) stays ignored.
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)
                         if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint (again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: model, AdamW, the step (which fixes the data position and the learning rate), RNG states.
# ---------------------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every random generator's state as lists and numbers, which JSON and torch.load(weights_only=True) both read:
    a checkpoint holds no object whose loading runs code, so opening a run directory someone else made is safe."""
    numpy_state = np.random.get_state()  # ("MT19937", (624,) uint32 keys, position, has_gauss, cached_gaussian)
    version, python_internal, python_gauss = random.getstate()
    return {"torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
            "python": [version, list(python_internal), python_gauss],
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}


def set_rng_state(state: dict):
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    version, python_internal, python_gauss = state["python"]
    random.setstate((version, tuple(python_internal), python_gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def save_checkpoint(path: Path, model, optimizer, step: int, sharded: bool = False, rank: int = 0):
    """The run's checkpoint after `step` optimizer steps: one file written by rank 0, or with --shard a directory of
    per-rank shards that every rank writes (shard.save_sharded, a collective)."""
    if sharded:
        shard.save_sharded(path, model, optimizer, {"step": step, "rng": rng_state()})
        return
    if rank != 0:
        return
    state = {
        "step": step,  # optimizer steps done: fixes the data position (epoch, batch) and the learning rate
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),  # tensors, numbers and tuples only
        "rng": rng_state(),
    }
    with atomic_file(path, "checkpoint", binary=True) as f:  # a full disk keeps the last complete checkpoint
        torch.save(state, f)


def load_checkpoint(path: Path, model, optimizer, sharded: bool = False) -> int:
    """Fills model and optimizer from the run's checkpoint (--shard: shard.load_sharded's directory, a collective),
    restores the RNG states and says so; -> the optimizer steps done, 0 when there is no checkpoint."""
    if sharded:
        extra = shard.load_sharded(path, model, optimizer)
        if extra is None:
            return 0
        step, rng = extra["step"], extra["rng"]
    else:
        if not path.exists():
            return 0
        try:  # weights_only: tensors, numbers and containers, never an arbitrary object
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MipoError(f"{path}: not a checkpoint this version of train.py wrote ({str(e).splitlines()[0][:200]}); "
                            "delete it to restart training from the stored pairs")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, rng = state["step"], state["rng"]
    set_rng_state(rng)
    if rank_zero():
        print(f"resuming from {path}: {step} optimizer step(s) done, training continues at step {step + 1}", flush=True)
    return step
