"""config.py's hardware choice: --dtype auto takes bf16 on a CPU only where bf16 products were measured faster, and
the measurement is kept, so every run on one machine picks the same dtype."""
import json

import torch

import config

CPUINFO = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512f{}\n"


def test_bf16_is_chosen_where_it_was_measured_faster_and_the_answer_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MIPO_CACHE", str(tmp_path / "cache"))
    cpuinfo = tmp_path / "cpuinfo"
    speed = {torch.float32: 2.0, torch.bfloat16: 1.0}
    monkeypatch.setattr(config, "matmul_seconds", lambda dtype: speed[dtype])

    cpuinfo.write_text(CPUINFO.format(""))  # no native bf16: never bf16, nothing measured or written
    assert config.cpu_has_fast_bf16(cpuinfo) is False
    assert not (tmp_path / "cache").exists()

    cpuinfo.write_text(CPUINFO.format(" avx512_bf16"))
    assert config.cpu_has_fast_bf16(cpuinfo) is True
    [kept] = (tmp_path / "cache" / "cpu-dtype").iterdir()
    assert json.loads(kept.read_text())["bfloat16_faster"] is True
    speed[torch.bfloat16] = 3.0  # a later, slower measurement is not taken: the kept answer stands
    assert config.cpu_has_fast_bf16(cpuinfo) is True

    monkeypatch.setenv("MIPO_CACHE", str(tmp_path / "other-cache"))  # a machine where bf16 is the slower one
    assert config.cpu_has_fast_bf16(cpuinfo) is False

