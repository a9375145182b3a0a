"""Below the method: files and formats, which import no method file. Reading and writing JSONL and JSON with one-line
errors (files), safetensors headers and generation_config.json (hf_files), the tokenizer and chat template
(tokenizer), where --model comes from (model_sources) and the bundled models' conversion (gguf_convert), the pairs
file and its resume (pairs_file), and the number format a device computes in (dtypes). A reader of the method can
skip this folder.
"""
