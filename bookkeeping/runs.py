"""A training run's machinery, which a reader of the method can skip: the checks made before anything is written,
the processes under torchrun and how a batch is split among them (Run), the run directory's settings, the steps'
checkpoint cadence and signals (Steps), the resumable reference pass's file, and checkpoints (tensors only, no
pickle) with the random-generator states.
"""
import contextlib
import gc
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import mipo
from bookkeeping import config, report
from bookkeeping.config import HardwareConfig, LossConfig, OptimConfig, PairsConfig
from formats import files, pairs_file
from formats.files import (RUN_CONFIG, RUN_METRICS, Interrupted, MipoError, append_jsonl, atomic_file, check_out,
                           crash_hook, read_jsonl, write_atomically)
from model_loader import check_model
from tasks import get_task, load_examples
from transforms import shard

# Settings that may change between a run and its resumption: they change how the work is done, not the result.
MAY_CHANGE = {"hardware.device", "hardware.gradient_checkpointing", "hardware.compile", "hardware.save_every",
              "hardware.save_minutes"}


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


@dataclass
class Run:
    """One training run: its settings, its directory, and its place among the processes. Every decision that depends
    on how many processes there are is made here, so that train.py reads the same for one process as for eight."""
    pairs: PairsConfig
    loss: LossConfig
    optim: OptimConfig
    hw: HardwareConfig
    out: Path
    rank: int = 0
    world: int = 1
    shared: Path | None = None  # a sweep's SWEEP/shared (bookkeeping/sweep.py); None: the run directory itself
    timings: dict = field(default_factory=dict)  # seconds per stage, for summary.json

    def shared_file(self, name: str, kind: str = "") -> Path:
        """Where a file of stages 1 and 2 is written: the run directory, or in a sweep the directory its variants
        share, where `kind` tells apart the files that differ between variants."""
        if self.shared is None:
            return self.out / name
        return self.shared / (f"{Path(name).stem}-{kind}{Path(name).suffix}" if kind else name)

    def link_shared(self, *names: str, kind: str = "") -> None:
        """In a sweep: the shared files also in the variant's own directory (a hard link, else a copy), so that each
        variant's directory holds every file of a single run."""
        for name in names:
            source, target = self.shared_file(name, kind), self.out / name
            if self.shared is not None and self.rank == 0 and source.exists() and not target.exists():
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copy2(source, target)
        self.barrier()

    def barrier(self):
        barrier(self.world)

    @contextlib.contextmanager
    def timed(self, stage: str):
        start = time.time()
        yield
        self.timings[stage] = time.time() - start

    def wrap(self, model):
        """The model that training runs forward and backward: DDP's wrapper over several unsharded processes (it
        all-reduces the gradients), the model itself otherwise (FSDP2 shards it in place, shard.shard_model)."""
        return torch.nn.parallel.DistributedDataParallel(model) if self.world > 1 and not self.hw.shard else model

    def share(self, batch: list) -> tuple[list, torch.Tensor]:
        """This process's pairs of a global batch and each one's weight in its summed loss: the weights make the
        processes' gradients add up to the mean over the global batch, however the batch is split."""
        if self.hw.shard:  # padded to equal shares, the padding at weight 0 (shard.shard_batch)
            mine, weights = shard.shard_batch(batch, self.rank, self.world)
            return mine, torch.tensor(weights)
        per_rank = len(batch) // self.world  # DDP averages the processes' equal shares
        mine = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
        return mine, torch.full((len(mine),), 1 / len(mine))

    def micro_batches(self, policy, batch: list):
        """(micro-batch, weights) of this process's share, in order. Under DDP the gradients are all-reduced in the
        last micro-batch's backward only (no_sync before it); FSDP reduce-scatters every one."""
        mine, weights = self.share(batch)
        m = self.optim.micro_batch_size
        for start in range(0, len(mine), m):
            last = start + m >= len(mine)
            with policy.no_sync() if isinstance(policy, DDP) and not last else contextlib.nullcontext():
                yield mine[start:start + m], weights[start:start + m]

    def reference_batches(self, records: list, order: list[int]) -> list[tuple[list, list[float]]]:
        """The micro-batches of the reference pass on this process, (pairs, weights): those of the first epoch of
        training, on the rank that trains on them, so that step 0 runs the very computation that produced its
        reference numbers, and the step-0 check is exact even in bf16 (a row's rounding depends on the padded shape
        of its batch). Fixed batches also make the pass resumable. Weight 0 marks shard.shard_batch's padding."""
        m, G = self.optim.micro_batch_size, self.optim.batch_size
        if not self.hw.shard:
            per_rank = G // self.world
            batches = [[records[i] for i in order[k:k + m]] for k in range(0, len(order), m)]
            return [(b, [1.0] * len(b)) for k, b in enumerate(batches) if (k * m % G) // per_rank == self.rank]
        mine = []  # under FSDP every rank runs the same forwards
        for k in range(0, len(order), G):
            share, weights = shard.shard_batch([records[i] for i in order[k:k + G]], self.rank, self.world)
            mine += [(share[j:j + m], weights[j:j + m]) for j in range(0, len(share), m)]
        return mine

    def clip_grad_norm(self, policy, max_norm: float) -> float:
        if self.hw.shard:
            return shard.clip_grad_norm(policy, max_norm)
        return torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm).item()

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, k) rows of every process, concatenated in rank order, on every process."""
        if self.world == 1:
            return rows
        rows = rows.to(self.hw.device)  # nccl gathers GPU tensors only
        parts = [torch.empty_like(rows) for _ in range(self.world)]
        dist.all_gather(parts, rows)
        return torch.cat(parts).cpu()

    def any(self, flags: list[bool]) -> list[bool]:
        """Each flag, true when it is true on any process: processes decide to checkpoint and to stop together."""
        if self.world == 1:
            return flags
        flags = torch.tensor(flags, dtype=torch.int32, device=self.hw.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [bool(f) for f in flags.tolist()]

    def every(self, flag: bool) -> bool:
        """True when flag is true on every process; under FSDP the processes must skip the same forwards."""
        return shard.every_rank(flag, self.hw.device) if self.hw.shard else flag

    def finish(self):
        if self.world > 1:
            # The sharded model's hooks form reference cycles that keep gloo's work objects alive; collected now,
            # not while the interpreter shuts down, where their C++ threads can abort a run that succeeded.
            gc.collect()
            dist.destroy_process_group()


def check(args):
    """train.py's settings from its flags, checked before anything is written: -> the configs and what the run
    directory (and a sweep's shared directory) record of them."""
    pairs_cfg, loss_cfg, opt_cfg, hw, out = config.resolve_config(args)
    optim = asdict(opt_cfg)
    if not opt_cfg.lora_rank:  # every weight trained: recorded as before LoRA existed, so older runs resume
        optim = {k: v for k, v in optim.items() if not k.startswith("lora_")}
    settings = {"pairs": asdict(pairs_cfg), "loss": asdict(loss_cfg), "optim": optim, "hardware": asdict(hw)}
    check_inputs(pairs_cfg, opt_cfg, out, settings)  # every rank, before anything is written: all refuse alike
    shared = Path(args.shared) if getattr(args, "shared", None) else None
    shared_settings = {"pairs": settings["pairs"], "hardware": {"dtype": hw.dtype},  # what stages 1 and 2 depend on
                       "optim": {k: settings["optim"][k] for k in ("batch_size", "micro_batch_size", "seed")}}
    if shared is not None:
        check_run_dir(shared, shared_settings)
    return (pairs_cfg, loss_cfg, opt_cfg, hw, out, shared), settings, shared_settings


def start(args) -> Run:
    """check(args), then the processes joined, the plan printed and the run directory made (or found, to resume)."""
    files.CRASH_AT = args._crash_at
    (pairs_cfg, loss_cfg, opt_cfg, hw, out, shared), settings, shared_settings = check(args)
    rank, world, hw.device = init_distributed(hw.device)
    if rank == 0:
        config.print_plan(pairs_cfg, loss_cfg, opt_cfg, hw, out, world)
        start_run_dir(out, settings)
        if shared is not None:
            start_run_dir(shared, shared_settings)
    barrier(world)
    torch.manual_seed(opt_cfg.seed)
    return Run(pairs_cfg, loss_cfg, opt_cfg, hw, out, rank, world, shared)


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
                raise MipoError(f"{path}: this run directory holds a run with {section}.{key} = {before!r}, "
                                f"this command asks for {value!r}; "
                                "pass another --out, or the same settings to resume it")


def start_run_dir(out: Path, settings: dict):
    """The run directory and its config.json, once check_inputs has passed (a resumed run keeps its own)."""
    if not (out / RUN_CONFIG).exists():
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / RUN_CONFIG, json.dumps(settings, indent=2) + "\n")


def read_pairs_file(path: Path, cfg: PairsConfig) -> list[dict]:
    """--pairs FILE: pairs sampled earlier. They must come from the model being trained: DPO's reference is that
    model, and MIPO's pairs are its own samples."""
    pairs = pairs_file.read_pairs(path)
    for pair in pairs:
        sampled_by = str(pair["sampling"].get("model", "")) if isinstance(pair["sampling"], dict) else ""
        if not same_model(sampled_by, cfg.model):
            raise MipoError(f"{path}: pair {pair['id']!r} was sampled by model {sampled_by!r}, "
                            f"not --model {cfg.model}; "
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


def build_pairs(run: Run, model, tokenizer, task, examples: list, path: Path) -> list[dict]:
    """mipo.build_pairs under torchrun: each process samples every world-th batch of prompts into its own samples
    file, with the batch's own seed, then rank 0 writes the pairs from all of them: the very pairs one process
    samples."""
    cfg = run.pairs
    if run.world == 1:
        return mipo.build_pairs(model, tokenizer, task, examples, path, cfg.negative, cfg.sampling, cfg.seed,
                                cfg.sample_batch_size, cfg.model)
    sample_files = [pairs_file.samples_path(path, (r, run.world)) for r in range(run.world)]
    if not path.exists():
        mipo.sample_pairs(model, tokenizer, task, examples, sample_files[run.rank], cfg.negative, cfg.sampling,
                          cfg.seed, cfg.sample_batch_size, cfg.model, progress=run.rank == 0,
                          shard=(run.rank, run.world))
    run.barrier()
    if run.rank == 0 and not path.exists():
        mipo.write_pairs(task, examples, sample_files, path, cfg.negative, cfg.seed)
    run.barrier()
    return pairs_file.read_pairs(path)


def resumable_pass(run: Run, path: Path, records: list[dict], batches: list[tuple[list, list[float]]], score,
                   desc: str) -> list[dict]:
    """score(batch) -> the batch's records with their new fields, for every batch of run.reference_batches, written
    into `path` with one line per record in `records`' order. Each process appends what it scores to a partial file
    of its own, batch by batch (a killed pass resumes after its last whole batch); rank 0 merges them."""
    if path.exists():
        return read_jsonl(path)
    partial = path.with_name(f"{path.stem}.rank{run.rank}-of-{run.world}.partial.jsonl")
    with append_jsonl(partial, "reference") as (kept, write):
        done = {r["id"]: r for r in kept}
        for batch, weights in tqdm(batches, desc=desc, unit="batch", disable=run.rank != 0):
            if run.every(all(r["id"] in done for r, w in zip(batch, weights) if w > 0)):
                continue
            scored = [r for r, w in zip(score(batch), weights) if w > 0]  # weight 0: a padding copy
            done.update((r["id"], r) for r in scored)
            write(scored)
    run.barrier()
    if run.rank == 0:  # the processes' files merged, in the records' order, into one file written atomically
        for r in range(1, run.world):
            other = path.with_name(f"{path.stem}.rank{r}-of-{run.world}.partial.jsonl")
            done.update((x["id"], x) for x in read_jsonl(other))
        write_atomically(path, "".join(json.dumps(done[r["id"]]) + "\n" for r in records))
        for r in range(run.world):
            path.with_name(f"{path.stem}.rank{r}-of-{run.world}.partial.jsonl").unlink(missing_ok=True)
    run.barrier()
    return read_jsonl(path)


class Steps:
    """The bookkeeping around train.py's optimizer steps, which its loop calls in the open:

        with runs.Steps(run, model, optimizer, total_steps) as steps:  # resumes from the last checkpoint
            for step in range(steps.start, total_steps):
                ...
                steps.log(metrics)  # metrics.jsonl, the progress bar, the step-0 check's line
                if steps.checkpoint_due(step + 1):  # every --save-minutes, and after a Ctrl-C or SIGTERM
                    steps.save_checkpoint(step + 1)  # then stops, after a Ctrl-C

    Resuming restores the model, AdamW, the step and the RNG states, and drops the metrics of the steps done again.
    An error raised in the loop leaves naming the last good checkpoint."""

    def __init__(self, run: Run, model, optimizer, total_steps: int):
        self.run, self.model, self.optimizer, self.total_steps = run, model, optimizer, total_steps
        self.path = run.out / ("checkpoint" if run.hw.shard else "checkpoint.pt")  # --shard: per-rank shards
        self.metrics_path = run.out / RUN_METRICS

    def __enter__(self):
        self.start = self.saved = load_checkpoint(self.path, self.model, self.optimizer, self.run.hw.shard)
        if self.run.rank == 0:  # the metrics history of the run being resumed, without the steps that are done again
            kept = [x for x in read_jsonl(self.metrics_path, missing_ok=True) if x["step"] <= self.start]
            write_atomically(self.metrics_path, "".join(json.dumps(x) + "\n" for x in kept))
        self.stop = StopRequest().__enter__()
        self.bar = tqdm(total=self.total_steps, initial=self.start, desc="DPO", unit="step", disable=self.run.rank != 0)
        self.saved_at = time.monotonic()
        return self

    def log(self, metrics: dict):
        if self.run.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            self.bar.update(1)
            if "step0/ok" in metrics:
                self.bar.write(report.step0_message(metrics, self.run.loss))
        crash_hook("train", metrics["step"])

    def checkpoint_due(self, steps_done: int) -> bool:
        """Every --save-minutes (every --save-every steps if given) before the last step, whose final model ends the
        stage, and after a Ctrl-C or SIGTERM; decided by all processes together."""
        hw = self.run.hw
        due = bool(hw.save_every and steps_done % hw.save_every == 0) or \
            bool(hw.save_minutes and time.monotonic() - self.saved_at >= 60 * hw.save_minutes)
        due, self.stopping = self.run.any([due and steps_done < self.total_steps, self.stop.signum is not None])
        return due or self.stopping

    def save_checkpoint(self, steps_done: int):
        save_checkpoint(self.path, self.model, self.optimizer, steps_done, self.run.hw.shard, self.run.rank)
        self.saved, self.saved_at = steps_done, time.monotonic()
        self.run.barrier()
        if self.stopping:
            raise Interrupted(self.stop.signum)  # None here: another rank's signal stops this one too

    def __exit__(self, kind, error, traceback):
        self.bar.close()
        self.stop.__exit__(kind, error, traceback)
        if isinstance(error, MipoError):
            last_good = f"{self.path} (step {self.saved})" if self.saved else "none yet"
            raise MipoError(f"{error}; last good checkpoint: {last_good}") from None


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
            raise MipoError(f"{path}: not a checkpoint this version of train.py wrote "
                            f"({str(e).splitlines()[0][:200]}); "
                            "delete it to restart training from the stored pairs")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, rng = state["step"], state["rng"]
    set_rng_state(rng)
    if rank_zero():
        print(f"resuming from {path}: {step} optimizer step(s) done, training continues at step {step + 1}", flush=True)
    return step
