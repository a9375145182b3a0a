"""Above the method: the commands' bookkeeping, imported only by train.py, eval.py, bench/, examples/ and the tests.
Settings and command lines (config), processes, run directories and checkpoints (runs), the held-out meter's files
(held_out), eval.py's models, items and cache (results), tables and plots (report), and sweeps (sweep). A reader of
the method can skip this folder.
"""
