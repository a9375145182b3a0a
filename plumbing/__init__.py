"""The machinery around the method: settings and command lines (config), files and errors (files), processes,
run directories and checkpoints (runs), FSDP2 (shard), the tokenizer and chat template (tokenizer), a model
directory's weight files and sampling defaults (hf_files), the pairs file and its resume (pairs_file), train.py's
held-out meter (held_out), what eval.py evaluates and where its results are cached (results), tables and plots
(report), where --model comes from (model_sources, gguf_convert), the CPU speed-ups the commands switch on
(cpu_speedups), sweeps (sweep) and low-rank adapters (lora). A reader of the method can skip this folder."""
