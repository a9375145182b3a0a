"""The tokenizer every stage uses, from a Hugging Face model directory: tokenizer.json through the `tokenizers`
package, the chat template (tokenizer_config.json or chat_template.jinja) rendered as transformers renders it, and
the ids that stop generation. model_loader.load_model returns one with each model.
"""
import json
import shutil
from datetime import datetime
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from formats.files import MipoError, read_json


class Tokenizer:
    """The interface every stage uses: encode, decode, apply_chat_template, stop_token_ids, pad_token_id."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
             "chat_template.jinja")

    def __init__(self, model_dir: Path, cfg):  # cfg: model_loader.ModelConfig, for its eos_token_id
        self.model_dir = Path(model_dir)
        path = self.model_dir / "tokenizer.json"
        if not path.exists():
            raise MipoError(f"{path}: file not found (only tokenizer.json tokenizers are supported)")
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise MipoError(f"{path}: cannot parse tokenizer ({str(e).splitlines()[0]})")
        config_path = self.model_dir / "tokenizer_config.json"
        tok_cfg = read_json(config_path) if config_path.exists() else {}
        gen_path = self.model_dir / "generation_config.json"
        gen_cfg = read_json(gen_path) if gen_path.exists() else {}

        def token_id(field):  # tokenizer_config stores special tokens as strings or {"content": ...}
            tok = tok_cfg.get(field)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return self.hf.token_to_id(tok) if tok else None

        self.bos_token_id = token_id("bos_token")
        self.eos_token_id = token_id("eos_token")
        self.bos_token = self.hf.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None
        self.eos_token = self.hf.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None
        # Some models (Llama-2, Llama-3 base) want BOS before every text; Qwen and SmolLM2 do not.
        self.add_bos = bool(tok_cfg.get("add_bos_token", False)) and self.bos_token_id is not None
        # Every id that ends a turn stops generation: the tokenizer's EOS plus generation_config's list
        # (which overrides config.json's, as in transformers' generate).
        ids = gen_cfg.get("eos_token_id", cfg.eos_token_id)
        stops = [self.eos_token_id] + (ids if isinstance(ids, list) else [ids])
        self.stop_token_ids = sorted({i for i in stops if i is not None})
        # Padding only fills batches; masks always come from lengths, so pad may equal EOS.
        pad = token_id("pad_token")
        self.pad_token_id = pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None else 0)
        template = tok_cfg.get("chat_template")
        if (self.model_dir / "chat_template.jinja").exists():  # transformers >= 4.43 may store it beside
            template = (self.model_dir / "chat_template.jinja").read_text()
        self.chat_template = template
        # The date a template may print ("Today Date: ..." in Llama 3's): fixed when the tokenizer is made, and set
        # by the pairs stage to the date recorded with the pairs, so that every stage renders the same prompts.
        self.date = datetime.now().date()

    def encode(self, text: str) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=True).ids
        if self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def pieces(self, ids) -> list[str]:
        """The text each id adds to the decoded text, special tokens written out: one piece per id, which joined are
        decode(ids, skip_special_tokens=False). An id that ends inside a character (one byte of a multi-byte UTF-8
        character) adds "", and the id that completes the character adds all of it. Each id is decoded after the
        one before it, so a word's leading space stays with the word (incremental detokenization)."""
        out, context, start = [], 0, 0  # ids[context:start] were decoded already; ids[start:k] wait for a character
        for k in range(len(ids)):
            before = self.decode(ids[context:start], skip_special_tokens=False)
            after = self.decode(ids[context:k + 1], skip_special_tokens=False)
            if after.endswith("\ufffd") and k + 1 < len(ids):
                out.append("")
                continue
            out.append(after[len(before):] if after.startswith(before) else after)
            context, start = start, k + 1
        return out

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise MipoError(f"{self.model_dir / 'tokenizer_config.json'}: field 'chat_template' is missing")
        return compile_chat_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            strftime_now=lambda fmt: datetime.combine(self.date, datetime.min.time()).strftime(fmt),  # as transformers'
        )

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes BOS itself where the model wants it, so no special tokens are added here
        # (the same choice as transformers' apply_chat_template).
        return self.hf.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False).ids

    def save(self, out_dir: Path) -> None:
        for name in self.FILES:
            if (self.model_dir / name).exists():
                shutil.copy(self.model_dir / name, Path(out_dir) / name)


_templates: dict = {}


def compile_chat_template(source: str):
    """Render HF chat templates the way the ecosystem does: an immutable jinja2 sandbox with
    trim_blocks / lstrip_blocks, loop controls, `raise_exception` and a non-escaping `tojson`."""
    if source not in _templates:
        def raise_exception(message):
            raise MipoError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii
        )
        env.globals["raise_exception"] = raise_exception
        _templates[source] = env.from_string(source)
    return _templates[source]
