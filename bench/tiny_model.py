"""A tiny random Llama with a word-level tokenizer and a ChatML template, written as a Hugging Face directory: what
each benchmark's --tiny mode and the tests run on, in seconds, with no download.

    from bench.tiny_model import write_tiny_model, write_prompts
"""
import json
from pathlib import Path

import torch

from formats.tokenizer import Tokenizer
from model_loader import CausalLM, ModelConfig, save_model

VOCAB = 211  # w0 ... w207, then <|im_start|> 208, <|im_end|> 209, <|endoftext|> 210
CONFIG = dict(model_type="llama", vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


def write_tiny_model(out_dir: Path, seed=0) -> Path:
    """A random tiny llama (seeded) with its tokenizer files, in out_dir; the tokenizer's sources in a sibling."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    out_dir = Path(out_dir)
    src = out_dir.with_name(out_dir.name + "-tokenizer")
    src.mkdir(parents=True)
    vocab = {f"w{i}": i for i in range(VOCAB - 3)}
    vocab.update({"<|im_start|>": 208, "<|im_end|>": 209, "<|endoftext|>": 210})
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tok.save(str(src / "tokenizer.json"))
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                           "chat_template": chatml}))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [209, 210]}))
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_dict(CONFIG)).eval()
    with torch.no_grad():  # sharper than the default init: a next-token distribution far from uniform
        model.lm_head.weight.mul_(20).div_(4)
    save_model(model, Tokenizer(src, model.config), out_dir)
    return out_dir


def write_prompts(path: Path, n: int) -> Path:
    """n prompts of 3 to 8 random words, as a jsonl task file (--task jsonl)."""
    gen = torch.Generator().manual_seed(7)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(f"w{int(t)}" for t in torch.randint(
                1, 200, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen))
            f.write(json.dumps({"id": f"q{i}", "prompt": words}) + "\n")
    return path
