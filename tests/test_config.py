"""bookkeeping/config.py's hardware choice: --dtype auto takes bf16 on a CPU only where bf16 products were measured
faster, and the measurement is kept, so every run on one machine picks the same dtype."""
import json
from types import SimpleNamespace

import pytest
import torch

from sampler import Sampling
import mipo
from bookkeeping import config
from formats import dtypes
from formats.files import MipoError

CPUINFO = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512f{}\n"


def test_bf16_is_chosen_where_it_was_measured_faster_and_the_answer_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MIPO_CACHE", str(tmp_path / "cache"))
    cpuinfo = tmp_path / "cpuinfo"
    speed = {torch.float32: 2.0, torch.bfloat16: 1.0}
    monkeypatch.setattr(dtypes, "matmul_seconds", lambda dtype: speed[dtype])

    cpuinfo.write_text(CPUINFO.format(""))  # no native bf16: never bf16, nothing measured or written
    assert dtypes.cpu_has_fast_bf16(cpuinfo) is False
    assert not (tmp_path / "cache").exists()

    cpuinfo.write_text(CPUINFO.format(" avx512_bf16"))
    assert dtypes.cpu_has_fast_bf16(cpuinfo) is True
    [kept] = (tmp_path / "cache" / "cpu-dtype").iterdir()
    assert json.loads(kept.read_text())["bfloat16_faster"] is True
    speed[torch.bfloat16] = 3.0  # a later, slower measurement is not taken: the kept answer stands
    assert dtypes.cpu_has_fast_bf16(cpuinfo) is True

    monkeypatch.setenv("MIPO_CACHE", str(tmp_path / "other-cache"))  # a machine where bf16 is the slower one
    assert dtypes.cpu_has_fast_bf16(cpuinfo) is False



def test_sampling_flags_override_the_models_generation_config(tmp_path):
    """top_k and repetition_penalty a flag or preset leaves out (None) come from the model's generation_config.json
    (transformers' 50 and 1.0 where it sets none); a flag wins over the file; every command checks the flags alike."""
    preset = Sampling(temperature=0.1, top_p=0.9, max_new_tokens=96)
    parse = lambda *flags: mipo.sampling_from_flags(mipo.pairs_parser().parse_args(list(flags)), preset)
    assert parse() == preset and parse().top_k is None and parse().repetition_penalty is None

    (tmp_path / "config.json").write_text("{}")  # what --model names: a model directory
    assert mipo.resolve_sampling(parse(), tmp_path) == Sampling(0.1, 0.9, 50, 96, 1.0)  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 20, "repetition_penalty": 1.1}))
    assert mipo.resolve_sampling(parse(), tmp_path) == Sampling(0.1, 0.9, 20, 96, 1.1)
    flags = parse("--top-k", "0", "--repetition-penalty", "1.0")  # off, whatever the model says
    assert mipo.resolve_sampling(flags, tmp_path) == Sampling(0.1, 0.9, 0, 96, 1.0)
    assert mipo.resolve_sampling(parse("--repetition-penalty", "1.3"), tmp_path) == Sampling(0.1, 0.9, 20, 96, 1.3)
    loaded = SimpleNamespace(generation_defaults={"top_k": 40, "repetition_penalty": 1.2})  # load_model's record
    assert mipo.resolve_sampling(parse("--top-k", "5"), loaded) == Sampling(0.1, 0.9, 5, 96, 1.2)

    for flags in (["--repetition-penalty", "0"], ["--top-k", "-1"]):
        with pytest.raises(MipoError, match="--repetition-penalty > 0"):
            parse(*flags)
    for parser in (config.train_parser, config.eval_parser):
        assert parser().parse_args(["--repetition-penalty", "1.05", "--top-k", "20"]).repetition_penalty == 1.05


def readme_gpu_commands() -> list[tuple[int, list[str]]]:
    """README's train.py commands with --preset paper: (processes, train.py's arguments), from its code blocks and
    its inline code (which may wrap over lines)."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", readme, re.DOTALL)
    inline = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", readme, flags=re.DOTALL).replace("\n", " "))
    commands = [line for block in blocks for line in block.splitlines()] + inline
    found = []
    for command in commands:
        words = shlex.split(command.split("#")[0])
        if "train.py" in words and "--preset" in words and words[words.index("--preset") + 1] == "paper":
            procs = int(next((w.split("=")[-1] if "=" in w else words[i + 1] for i, w in enumerate(words)
                              if w.startswith("--nproc_per_node")), 1))
            found.append((procs, [w for w in words[words.index("train.py") + 1:] if w != "--"]))
    return found


def test_the_readmes_gpu_commands_fit_their_memory_check(tmp_path):
    """Every `--preset paper` command README shows is one train.py's memory check accepts on 80 GB GPUs (the model
    by its directory's name in shard.PAPER_MODELS; prompts and responses of 512 tokens, as the scaling tables):
    bookkeeping/config.py's fit_to_gpu, which refuses what does not fit in one line."""
    from transforms import shard

    commands = readme_gpu_commands()
    assert any(procs == 1 for procs, _ in commands)  # a one-GPU example is among them
    by_dir = {hub.split("/")[-1]: name for name, hub in shard.HUB_NAMES.items()}
    for procs, argv in commands:
        args = config.train_parser().parse_args(argv)
        model_dir = tmp_path / args.model.strip("/").replace("/", "_")
        model_dir.mkdir(exist_ok=True)
        (model_dir / "config.json").write_text(json.dumps(shard.PAPER_MODELS[by_dir[args.model.split("/")[-1]]]))
        opt = config.OptimConfig(lora_rank=args.lora_rank[0] if isinstance(args.lora_rank, list) else args.lora_rank)
        hw = config.HardwareConfig(device="cuda", dtype="bfloat16", shard=args.shard)
        opt, hw = config.fit_to_gpu(str(model_dir), 512, 512, opt, hw, procs, 80 * 2**30)  # a refusal raises
        assert opt.micro_batch_size >= 1
    with pytest.raises(MipoError, match="add --shard or more GPUs"):  # the check refuses what does not fit
        seven_b = tmp_path / "7b"
        seven_b.mkdir()
        (seven_b / "config.json").write_text(json.dumps(shard.PAPER_MODELS["qwen2.5-7b"]))
        config.fit_to_gpu(str(seven_b), 512, 512, config.OptimConfig(), config.HardwareConfig(device="cuda"), 1,
                          80 * 2**30)
