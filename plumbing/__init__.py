"""The machinery around the method: settings and command lines (config), files and errors (files), processes,
run directories and checkpoints (runs), FSDP2 (shard), where eval.py's results are cached (results), tables and
plots (report), where --model comes from (model_sources, gguf_convert), the CPU speed-ups the commands switch on
(cpu_speedups), sweeps (sweep) and low-rank adapters (lora). A reader of the method can skip this folder."""
