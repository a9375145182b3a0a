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
