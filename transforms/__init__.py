"""Beside the method: opt-in transforms of a model that a command switches on in the open and names in its printed
plan. CPU speed-ups (cpu_speedups; MIPO_CPU_SPEEDUPS=0 switches them all off), low-rank adapters (lora, --lora-rank)
and FSDP2 sharding (shard, --shard). Each hands back or changes the model it is given; none rebinds another module's
function or an object's class. A reader of the method can skip this folder.
"""
