"""Which number format (dtype) a run computes in: --dtype auto picks bfloat16 on a GPU, and on a CPU where bf16 matrix
products were measured faster than float32 ones (measured once per CPU model and kept in the cache), else float32.
"""
import hashlib
import json
import re
import time
from pathlib import Path

import torch

from formats.files import cache_dir, read_json, write_atomically

DTYPES = ("auto", "float32", "bfloat16")
AUTO_DTYPE = "auto: bfloat16 on a GPU, and on a CPU where bf16 matrix products were measured faster, else float32"


def cpu_has_fast_bf16(cpuinfo_path=Path("/proc/cpuinfo")) -> bool:
    """Whether bf16 matrix products beat float32 ones on this CPU. Native bf16 instructions (AVX-512 BF16, AMX) are
    needed but not enough: some CPUs with AVX-512 BF16 and no AMX run bf16 products slower than float32 ones, others
    with the same flag run them faster (docs/performance.md). So it is measured, once per CPU model, thread count
    and torch version, and the answer kept in the cache: every later run on the machine picks the same dtype."""
    try:
        cpuinfo = cpuinfo_path.read_text()
    except OSError:
        return False
    if " avx512_bf16" not in cpuinfo and " amx_bf16" not in cpuinfo:
        return False  # emulated: always slower
    name = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    machine = f"{name.group(1) if name else '?'}|{torch.get_num_threads()} threads|torch {torch.__version__}"
    path = cache_dir() / "cpu-dtype" / f"{hashlib.sha256(machine.encode()).hexdigest()[:16]}.json"
    if path.exists():
        return read_json(path)["bfloat16_faster"]
    seconds = {str(d).removeprefix("torch."): matmul_seconds(d) for d in (torch.float32, torch.bfloat16)}
    faster = seconds["bfloat16"] < seconds["float32"]
    write_atomically(path, json.dumps({"machine": machine, "seconds_1024^3": seconds, "bfloat16_faster": faster},
                                      indent=2))
    return faster


def matmul_seconds(dtype, n=1024, repeats=5, device="cpu") -> float:
    """The best of a few n^3 matrix products in dtype (the first, which loads the kernel, not counted)."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(dtype, n=2048, device="cpu") -> float:
    """FLOP/s of the best of ten n^3 products: the peak the benchmarks measure their floors against."""
    return 2 * n**3 / matmul_seconds(dtype, n=n, repeats=10, device=device)


def compute_dtype(flag: str | None, device) -> str:
    """--dtype auto (or left out): bfloat16 where the hardware multiplies it faster than float32 (a GPU with bf16,
    a CPU where cpu_has_fast_bf16 measured it), else float32."""
    if flag not in (None, "auto"):
        return flag
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def torch_dtype(flag: str | None, device) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[compute_dtype(flag, device)]
