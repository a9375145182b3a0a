"""transforms/shard.py: a DPO step of FSDP2 over two CPU processes (gloo) equals the same step in one process on the whole
global batch; a sharded checkpoint resumes to the very weights of an uninterrupted run; bf16 mixed precision keeps
float32 master weights and float32 RoPE tables; the memory model counts parameters exactly.

The two processes run every distributed case in one spawn (each start costs seconds); the single-process runs they
are compared with happen in the test process itself."""
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from transforms import shard
from conftest import RunsCodeWhenUnpickled, make_tiny_model, naive_sequence_logps
from dpo_loss import preference_loss
from model_loader import ModelConfig, rope_inv_freq
from formats.files import MipoError

WORLD = 2
LR = 1e-3  # large, so that one step moves every weight far beyond float32 rounding
CASES = {  # name: model overrides, global batch G, micro-batch, gradient checkpointing in the sharded run
    "untied": dict(model={}, G=4, micro=1, checkpointing=True),
    "tied": dict(model={"tie_word_embeddings": True}, G=4, micro=2, checkpointing=False),
    "qwen2": dict(model={"model_type": "qwen2"}, G=4, micro=2, checkpointing=False),  # q/k/v biases
    "one_pair": dict(model={}, G=1, micro=1, checkpointing=False),  # world > G: rank 1 runs a weight-0 copy
}


# ---------------------------------------------------------------------------------------------------------------
# The DPO step both sides run: pairs of random token ids, chosen and rejected scored under the same prompt.
# ---------------------------------------------------------------------------------------------------------------


def make_pairs(n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        length = lambda low, high: int(torch.randint(low, high, (1,), generator=gen))  # noqa: E731
        prompt, chosen, rejected = (torch.randint(0, 97, (length(lo, hi),), generator=gen).tolist()
                                    for lo, hi in ((2, 6), (2, 7), (2, 7)))
        ref = torch.randn(2, generator=gen) * 3 - 20  # any reference log-probs: the loss is then not ln 2
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                      "ref_chosen": ref[0].item(), "ref_rejected": ref[1].item()})
    return pairs


def pair_losses(model, pairs: list[dict]):
    """Sigmoid DPO loss per pair, (B,): rows [:B] prompt + chosen, rows [B:] prompt + rejected, right-padded."""
    rows = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    T = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)  # (2B, T)
    completion_mask = torch.zeros(len(rows), T, dtype=torch.bool)  # (2B, T) from lengths, never from a pad id
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        completion_mask[i, len(pairs[i % len(pairs)]["prompt"]):len(row)] = True
    logps = naive_sequence_logps(model(input_ids), input_ids, completion_mask)  # (2B,)
    lengths = completion_mask[:, 1:].sum(-1)  # (2B,)
    B = len(pairs)
    ref_chosen = torch.tensor([p["ref_chosen"] for p in pairs])
    ref_rejected = torch.tensor([p["ref_rejected"] for p in pairs])
    losses, _, _ = preference_loss("sigmoid", logps[:B], logps[B:], ref_chosen, ref_rejected, lengths[:B], lengths[B:],
                                   beta=0.1)
    return losses


def new_optimizer(model):
    # train.py's AdamW, fused on the CPU as there; it accepts DTensor parameters unchanged
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8, fused=True)


def single_step(model, optimizer, batch):
    """-> (the gradient norm before clipping, the clipped gradients AdamW used)."""
    pair_losses(model, batch).mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, grads


def sharded_step(model, optimizer, batch, micro: int):
    """train.py --shard's step: this rank's slots, micro-batches accumulated, weights from shard_batch.
    -> (the gradient norm before clipping, the clipped gradients gathered from their shards)."""
    mine, weights = shard.shard_batch(batch, dist.get_rank(), dist.get_world_size())
    for start in range(0, len(mine), micro):
        losses = pair_losses(model, mine[start:start + micro])  # (micro,)
        (losses * torch.tensor(weights[start:start + micro])).sum().backward()
    norm = shard.clip_grad_norm(model, 1.0)
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}  # collective, same order everywhere
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, grads


def batches(G: int) -> list[list[dict]]:
    return [make_pairs(G, seed=1), make_pairs(G, seed=2)]


def bf16_input():
    return torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(5))  # positions up to 39


# ---------------------------------------------------------------------------------------------------------------
# The two processes.
# ---------------------------------------------------------------------------------------------------------------


def worker(rank: int, tmp: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    results = {"every_rank": (shard.every_rank(True), shard.every_rank(rank == 0))}
    for name, case in CASES.items():
        step1, step2 = batches(case["G"])
        model = shard.shard_model(make_tiny_model(**case["model"]).train())
        model.gradient_checkpointing = case["checkpointing"]
        with torch.no_grad():  # train.py's reference pass: a no-grad forward before the optimizer exists
            pair_losses(model.eval(), step1)
        model.train()
        optimizer = new_optimizer(model)
        norm1, grads1 = sharded_step(model, optimizer, step1, case["micro"])
        ckpt = Path(tmp) / f"checkpoint-{name}"
        shard.save_sharded(ckpt, model, optimizer, {"step": 1, "case": name})
        after1 = shard.full_model_on_rank0(model)
        norm2, grads2 = sharded_step(model, optimizer, step2, case["micro"])
        after2 = shard.full_model_on_rank0(model)
        # The tie on the sharded model itself (full_model_on_rank0 ties its copy again, whatever FSDP did): one
        # parameter under both names, which after two steps still holds the same values.
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        same_values = torch.equal(model.lm_head.weight.full_tensor(), model.model.embed_tokens.weight.full_tensor())

        if name == "untied" and rank == 0:  # a kill between save_sharded's two renames leaves only .old
            ckpt.rename(ckpt.with_name(ckpt.name + ".old"))
        dist.barrier()
        # Resume: a fresh model from ANOTHER seed and a fresh AdamW, so nothing right can come from anywhere but
        # the checkpoint (the weights, and the AdamW moments and step count that step 2 needs).
        resumed = shard.shard_model(make_tiny_model(seed=123, **case["model"]).train())
        resumed.gradient_checkpointing = case["checkpointing"]
        resumed_optimizer = new_optimizer(resumed)
        extra = shard.load_sharded(ckpt, resumed, resumed_optimizer)
        sharded_step(resumed, resumed_optimizer, step2, case["micro"])
        after2_resumed = shard.full_model_on_rank0(resumed)
        if rank == 0:
            results[name] = {"after1": after1.state_dict(), "after2": after2.state_dict(), "norms": (norm1, norm2),
                             "grads1": grads1, "grads2": grads2,
                             "after2_resumed": after2_resumed.state_dict(), "extra": extra,
                             "tied": tied, "same_values": same_values}

    # bf16 compute over float32 master weights: the forward must be exactly that of the model cast to bf16 with
    # its RoPE tables left in float32; weights and gradients stay float32 shards.
    model = shard.shard_model(make_tiny_model().train(), param_dtype=torch.bfloat16)
    logits = model(bf16_input())
    logits.float().logsumexp(-1).mean().backward()
    if rank == 0:
        results["bf16"] = {"logits": logits.detach(),
                           "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                           "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()})}
    torch.save(results, Path(tmp) / f"rank{rank}.pt")
    dist.barrier()  # no rank tears down its connections while the other may still be using them
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shard")
    mp.start_processes(worker, args=(str(tmp),), nprocs=WORLD, start_method="spawn")
    return torch.load(tmp / "rank0.pt", weights_only=True)  # tensors, numbers, strings and containers


def single_process_run(case: dict):
    """The same two steps in one process, on the whole global batch, no FSDP."""
    model = make_tiny_model(**case["model"]).train()
    optimizer = new_optimizer(model)
    states, norms, grads = [], [], []
    for batch in batches(case["G"]):
        norm, grad = single_step(model, optimizer, batch)
        norms.append(norm)
        grads.append(grad)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states, norms, grads


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------------------------
# Equivalence and resume
# ---------------------------------------------------------------------------------------------------------------


BETAS, ADAM_EPS = (0.9, 0.95), 1e-8


def adamw_by_hand(initial: dict, grads: list[dict]) -> dict:
    """The weights after len(grads) AdamW steps (weight decay 0) on these gradients, in float64 from the
    formula (Loshchilov and Hutter, Algorithm 2, with bias correction), not from torch.optim."""
    b1, b2 = BETAS
    weights = {}
    for name, value in initial.items():
        w, m, v = value.double(), 0.0, 0.0
        for t, g in enumerate(grads, start=1):
            g = g.get(name, g["model.embed_tokens.weight"]).double()  # tied lm_head: the embedding's gradient
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            w = w - LR * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + ADAM_EPS)
        weights[name] = w
    return weights


def assert_adamw_applied(got: dict, initial: dict, grads: list[dict]):
    """got holds the float32 weights AdamW reached from initial with these gradients: the float64 formula up to
    float32 rounding, one unit in the last place of the weight per step (a step moves a weight by about lr = 1e-3,
    so a missed or wrong update is 1e4 times the bound). The gradients are the run's own, so this holds exactly;
    comparing two runs' weights instead would magnify their gradients' last-bit differences, g / (|g| + eps)
    turning 1e-10 into 1e-2 of lr wherever a gradient entry is near eps."""
    expected = adamw_by_hand(initial, grads)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        bound = len(grads) * 2.0 ** -23 * value.abs() + 1e-8  # 2^-23: float32's relative spacing
        excess = ((got[name].double() - value).abs() - bound).max().item()
        assert excess <= 0, f"{name}: {excess:.2e} beyond float32 rounding of the AdamW update of its gradients"


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_step_equals_single_process_step(distributed, name):
    (single1, single2), single_norms, (grads1, grads2) = single_process_run(CASES[name])
    got = distributed[name]
    initial = make_tiny_model(**CASES[name]["model"]).state_dict()
    assert max_diff(single1, initial) > 0.5 * LR  # the step moved the weights (Adam: by about lr), far past 1e-6
    # The logged, pre-clip norm of the full gradient is the one-process norm: a gradient off by any factor (a sum
    # where a mean belongs, a missing division by the number of ranks) fails here, though AdamW would hide it.
    assert got["norms"] == pytest.approx(single_norms, rel=1e-6)
    assert single_norms[0] > 1.0  # so clipping was active, and its norm had to be the global one
    # The gradient FSDP reduce-scattered (after clipping) is the one-process gradient, to float32 rounding ...
    scale = max(g.abs().max().item() for g in grads1.values())
    assert max_diff(got["grads1"], grads1) <= 2e-6 * scale
    # ... and each run's AdamW applied its own gradients, one step and two (the formula checked on one process too).
    assert_adamw_applied(single1, initial, [grads1])
    assert_adamw_applied(single2, initial, [grads1, grads2])
    assert_adamw_applied(got["after1"], initial, [got["grads1"]])
    assert_adamw_applied(got["after2"], initial, [got["grads1"], got["grads2"]])


def test_every_rank(distributed):
    assert distributed["every_rank"] == (True, False)  # rank 1's False wins on rank 0 too


def test_tied_embeddings_stay_tied(distributed):
    # On the sharded model that trained: one parameter for lm_head and the embedding, equal values after two steps.
    assert distributed["tied"]["tied"] and distributed["tied"]["same_values"]
    assert not distributed["untied"]["tied"] and not distributed["untied"]["same_values"]


@pytest.mark.parametrize("name", list(CASES))
def test_resume_from_sharded_checkpoint_gives_the_same_weights(distributed, name):
    got = distributed[name]
    assert got["extra"] == {"step": 1, "case": name}
    for key, value in got["after2"].items():  # bit for bit, not merely close
        assert torch.equal(got["after2_resumed"][key], value), key


def test_bf16_mixed_precision_keeps_float32_master_weights_and_rope(distributed):
    got = distributed["bf16"]
    assert got["param_dtypes"] == got["grad_dtypes"] == ["torch.float32"]
    model = make_tiny_model().to(torch.bfloat16)
    model.inv_freq = rope_inv_freq(model.config)  # .to() cast the buffer too; FSDP leaves it in float32
    with torch.no_grad():
        expected = model(bf16_input())
    assert got["logits"].dtype == torch.bfloat16
    assert torch.equal(got["logits"], expected)


# ---------------------------------------------------------------------------------------------------------------
# The global batch split (no processes needed)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G, world", [(4, 1), (4, 2), (4, 4), (4, 8), (4, 3), (1, 2)])
def test_shard_batch_keeps_the_global_batch(G, world):
    batch = list(range(G))
    shares = [shard.shard_batch(batch, rank, world) for rank in range(world)]
    slots = math.ceil(G / world)
    assert all(len(mine) == slots for mine, _ in shares)  # every rank runs the same forwards (FSDP's collectives)
    gathered = [x for mine, _ in shares for x in mine]
    weights = [w for _, ws in shares for w in ws]
    assert gathered[:G] == batch  # gathered in rank order, the first G rows are the batch, in order
    assert all(w == 0 for w in weights[G:])
    # FSDP divides the summed gradient by world: each real pair must end with weight 1 / G
    assert [w / world for w in weights[:G]] == pytest.approx([1 / G] * G)


# ---------------------------------------------------------------------------------------------------------------
# The memory model
# ---------------------------------------------------------------------------------------------------------------


def test_parameter_count_by_hand():
    cfg = make_tiny_model().config  # V 97, C 48, I 64, 2 layers, 6 heads / 2 KV heads of 8, untied, no biases
    layer = 48 * 48 + 2 * 48 * 16 + 48 * 48 + 3 * 48 * 64 + 2 * 48  # q, k+v, o, SwiGLU, two norms = 15456
    assert shard.count_parameters(cfg)["total"] == 2 * 97 * 48 + 2 * layer + 48 == 40272
    for overrides in ({}, {"tie_word_embeddings": True}, {"model_type": "qwen2"},
                      {"model_type": "qwen3", "head_dim": 12}):
        model = make_tiny_model(**overrides)
        assert shard.count_parameters(model.config)["total"] == sum(p.numel() for p in model.parameters()), overrides
    # the published sizes: Llama-3.2-1B's 1,235,814,400 and Qwen2.5-7B's 7,615,616,512 parameters
    assert shard.count_parameters(shard.paper_config("llama-3.2-1b"))["total"] == 1_235_814_400
    assert shard.count_parameters(shard.paper_config("qwen2.5-7b"))["total"] == 7_615_616_512


def test_memory_plan():
    cfg = make_tiny_model().config
    N = 40272
    single = shard.memory_plan(cfg, 1, "single")
    assert (single["parameters"], single["gradients"], single["optimizer"]) == (4 * N, 4 * N, 8 * N)
    assert single["gathered"] == 2 * N  # autocast's bf16 copy of the weights
    assert shard.memory_plan(cfg, 1, "single", param_bytes=4)["gathered"] == 0  # float32 compute: no copy
    assert shard.memory_plan(cfg, 2, "ddp")["gathered"] == 2 * N + 4 * N  # + DDP's gradient buckets
    for world in (2, 4, 8):
        fsdp = shard.memory_plan(cfg, world, "fsdp")
        for part in ("parameters", "gradients", "optimizer"):
            assert fsdp[part] == single[part] / world
    big = shard.paper_config("qwen2.5-7b")
    with_ckpt, without = (shard.memory_plan(big, 4, "fsdp", ckpt)["activations"] for ckpt in (True, False))
    assert with_ckpt < without / 5
    assert (shard.memory_plan(big, 4, "fsdp", micro_batch_pairs=2)["logits"]
            > shard.memory_plan(big, 4, "fsdp")["logits"])
    with pytest.raises(MipoError, match="strategy single"):
        shard.memory_plan(cfg, 2, "single")


def test_choose_layout_keeps_global_batch_and_refuses_what_cannot_fit():
    big = shard.paper_config("qwen2.5-7b")
    for world in (2, 4, 8):
        layout = shard.choose_layout(big, world, "fsdp", 80 * 2**30)
        slots = math.ceil(shard.GLOBAL_BATCH / world)
        assert slots % layout["micro_batch_pairs"] == 0  # accumulation steps x micro-batch x world covers the batch
        assert layout["plan"]["total"] <= 80 * 2**30
    with pytest.raises(MipoError, match="add --shard or more GPUs"):
        shard.choose_layout(big, 1, "single", 80 * 2**30)  # 16 bytes per parameter alone: 122 GB
    small = shard.paper_config("qwen2.5-0.5b")
    assert shard.choose_layout(small, 1, "single", 80 * 2**30)["micro_batch_pairs"] == 4  # no accumulation needed


def test_paper_models_parse_and_table_prints():
    for name, raw in shard.PAPER_MODELS.items():
        assert isinstance(ModelConfig.from_dict(raw, name), ModelConfig)
    table = shard.memory_table()
    assert table.count("\n") == 7 and "Qwen/Qwen2.5-7B-Instruct" in table
    commands = shard.paper_commands()
    assert "torchrun --standalone --nproc_per_node 8 train.py -- --model /models/Qwen2.5-7B-Instruct" in commands
    assert "| Qwen/Qwen2.5-7B-Instruct | 1 | does not fit" in commands


def markdown_tables(text: str) -> list[str]:
    """Every run of consecutive lines that start with "|", as one string."""
    tables, run = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            run.append(line)
        elif run:
            tables.append("\n".join(run))
            run = []
    return tables


def test_scaling_doc_holds_exactly_what_shard_prints(capsys):
    """docs/scaling.md embeds the tables of `python -m transforms.shard --table` and `--commands`, and the plan of
    `--plan qwen2.5-7b --gpus 4`: each must be the one the code prints now, row for row and number for number
    (regenerate them with those commands when the memory model changes)."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "scaling.md").read_text(encoding="utf-8")
    tables = markdown_tables(doc)
    for printed in (shard.memory_table(), shard.breakdown_table(), shard.lora_table(), shard.paper_commands()):
        header = printed.splitlines()[0]
        in_doc = [table for table in tables if table.splitlines()[0] == header]
        assert len(in_doc) == 1, f"docs/scaling.md: {len(in_doc)} tables headed {header}"
        assert in_doc[0] == printed, f"docs/scaling.md: the table headed {header} is not what shard.py prints"
    shard.main(["--plan", "qwen2.5-7b", "--gpus", "4"])
    plan = capsys.readouterr().out
    assert f"```\n{plan}```" in doc, "docs/scaling.md: the plan printout is not `--plan qwen2.5-7b --gpus 4`'s"


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints from elsewhere hold weights, never code (no processes needed)
# ---------------------------------------------------------------------------------------------------------------


def test_checkpoint_metadata_that_names_other_code_or_holds_non_tensors_is_refused(tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    crafted, marker = tmp_path / "crafted", tmp_path / "code-ran"
    crafted.mkdir()
    (crafted / ".metadata").write_bytes(pickle.dumps(RunsCodeWhenUnpickled(marker)))
    with pytest.raises(MipoError, match="not a checkpoint train.py wrote"):
        shard.TensorCheckpointReader(crafted).read_metadata()
    assert not marker.exists()
    # torch.distributed.checkpoint loads a non-tensor entry with an unrestricted torch.load: none may pass
    (crafted / ".metadata").write_bytes(
        pickle.dumps(Metadata(state_dict_metadata={"optimizer.x": BytesStorageMetadata()})))
    with pytest.raises(MipoError, match="entries that are not tensors"):
        shard.TensorCheckpointReader(crafted).read_metadata()
