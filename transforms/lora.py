"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685), which a reader of the method can skip. With
--lora-rank R, each chosen linear layer y = W x + b becomes y = W x + b + (alpha / R) B A x: W and b frozen, A (R, in)
drawn as PEFT draws it, B (out, R) zero, so that before the first update the model is the reference exactly (the
step-0 check still reads 0 nats). AdamW then trains A and B only. The final model is W + (alpha / R) B A merged into
a plain Hugging Face directory, and the adapter alone goes to RUN/adapter in PEFT's layout, which peft's
PeftModel.from_pretrained loads onto the base model. The paper fine-tunes every weight; this is an option.
"""
import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from formats.files import MipoError
from formats.model_sources import resolve_model_dir

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # attention and MLP


class LoRALinear(nn.Module):
    """base_layer(x) + scaling * lora_B(lora_A(x)); the submodules are named as PEFT names them."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)  # as PEFT's default
        nn.init.zeros_(self.lora_B.weight)
        self.to(base.weight.device)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return self.base_layer.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight)


def add_adapters(model, rank: int, alpha: float, targets=TARGETS, seed: int = 0) -> None:
    """Freeze every weight of model and put an adapter beside each linear layer named in targets."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise MipoError(f"--lora-targets {' '.join(sorted(unknown))}: not a linear layer of the decoder; "
                        f"choose from {' '.join(TARGETS)}")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)  # A's draw: the same adapters in every process
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, generator))


def adapters(model) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def merge(model) -> None:
    """In place: every adapter folded into its layer's weight, and the plain nn.Linear put back."""
    with torch.no_grad():
        for name, module in adapters(model).items():
            module.base_layer.weight.copy_(module.merged_weight())
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base_layer)


def save_adapter(model, base_model: str, out_dir: Path, rank: int, alpha: float, targets) -> None:
    """PEFT's layout: adapter_config.json and adapter_model.safetensors, whose keys are
    base_model.model.<module>.lora_A.weight and .lora_B.weight (call it before merge). Written under a temporary
    name, then renamed."""
    tensors = {f"base_model.model.{name}.{part}.weight": getattr(module, part).weight.detach().float().cpu()
               for name, module in adapters(model).items() for part in ("lora_A", "lora_B")}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": str(resolve_model_dir(base_model)), "r": rank, "lora_alpha": alpha,
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "inference_mode": True, "use_rslora": False, "use_dora": False,
              "modules_to_save": None}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def adapter_parameters(cfg, rank: int, targets=TARGETS) -> int:
    """The trainable parameters: rank x (in + out) per adapted linear layer, for the memory plan."""
    C, H, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"q_proj": (C, cfg.num_attention_heads * D), "k_proj": (C, cfg.num_key_value_heads * D),
              "v_proj": (C, cfg.num_key_value_heads * D), "o_proj": (cfg.num_attention_heads * D, C),
              "gate_proj": (C, H), "up_proj": (C, H), "down_proj": (H, C)}
    return cfg.num_hidden_layers * sum(rank * sum(shapes[t]) for t in targets)
