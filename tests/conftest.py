import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the top-level modules, from any cwd

from model_loader import CausalLM, ModelConfig  # noqa: E402


def make_tiny_model(model_type="llama", seed=0, vocab_size=97, **overrides):
    """A randomly initialized decoder small enough for exact, fast tests (no files, no tokenizer)."""
    raw = dict(model_type=model_type, vocab_size=vocab_size, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_dict({**raw, **overrides}))
    with torch.no_grad():  # larger than default init, so the next-token distribution is far from uniform
        model.lm_head.weight.mul_(20)
    return model.eval()


class RunsCodeWhenUnpickled:
    """What a crafted pickle holds: unpickling it calls a function of the file's choice (here: create marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture
def tiny_model():
    return make_tiny_model()


def naive_sequence_logps(logits, input_ids, completion_mask):
    """A reference for the summed log-probs: full float32 log-softmax over (B, T, V), gather, mask, sum -> (B,)."""
    logps = torch.log_softmax(logits.float(), dim=-1)[:, :-1]  # (B, T-1, V): position t scores token t + 1
    picked = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (picked * completion_mask[:, 1:]).sum(-1)
