"""Benchmarks of loraforge against its peers (transformers + PEFT, bitsandbytes), side by side.

Run them all with ``python -m benchmarks.run [--quick] [--device cpu|cuda] [--only NAMES]``;
see ``benchmarks/run.py`` for the table it prints and ``benchmarks/common.py`` for how time and
memory are measured.
"""
