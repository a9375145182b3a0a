"""What model_loader.py reads from a Hugging Face directory besides the config and the tokenizer, checked before a
weight is loaded: which safetensors files hold the weights, that they hold every tensor the model needs with the
right shape (from the headers alone), and the sampling defaults of its generation_config.json.
"""
from pathlib import Path

import torch
from safetensors import safe_open

from formats.files import MipoError, read_json


def weight_files(model_dir: Path) -> list[Path]:
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise MipoError(f"{index}: field 'weight_map' is missing or empty")
        return [model_dir / s for s in shards]
    raise MipoError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def check_weights(model_dir: Path, model: torch.nn.Module) -> dict[str, Path]:
    """The file of every tensor of model (a model_loader.CausalLM, on the meta device or not) in model_dir, checked
    from the safetensors headers alone (no weight is read): no tensor missing, none unexpected, every shape right."""
    cfg = model.config
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")  # the same tensor as model.embed_tokens.weight
    found = {}
    for path in weight_files(model_dir):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and cfg.tie_word_embeddings):
                        continue  # recomputed from the config / tied: some checkpoints carry them anyway
                    if key not in expected:
                        raise MipoError(f"{path}: unexpected tensor {key!r} for a {cfg.model_type} model")
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != expected[key]:
                        raise MipoError(f"{path}: tensor {key!r} has shape {shape}, "
                                        f"config.json implies {expected[key]}")
                    found[key] = path
        except MipoError:
            raise
        except FileNotFoundError:
            raise MipoError(f"{path}: file not found (listed in model.safetensors.index.json)")
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise MipoError(f"{path}: cannot read safetensors file ({str(e).splitlines()[0]}); "
                            "re-download or re-convert it")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise MipoError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")
    return found


# transformers' GenerationConfig defaults for the two sampling settings a model's generation_config.json may set.
TRANSFORMERS_SAMPLING_DEFAULTS = {"top_k": 50, "repetition_penalty": 1.0}


def generation_defaults(model_dir) -> dict:
    """The sampling settings transformers' generate takes from a model directory's generation_config.json when the
    call leaves them out, as the paper's generate(do_sample=True, temperature=T, top_p=P) does: {"top_k",
    "repetition_penalty"}, transformers' defaults where the file or a key is missing (or null). temperature, top_p
    and do_sample are not read: the paper's calls pass them."""
    path = Path(model_dir) / "generation_config.json"
    config = read_json(path) if path.exists() else {}
    given = {key: config.get(key) for key in TRANSFORMERS_SAMPLING_DEFAULTS if config.get(key) is not None}
    try:
        defaults = {**TRANSFORMERS_SAMPLING_DEFAULTS, **given}
        return {"top_k": int(defaults["top_k"]), "repetition_penalty": float(defaults["repetition_penalty"])}
    except (TypeError, ValueError):
        raise MipoError(f"{path}: top_k must be an integer and repetition_penalty a number; got {given}")
