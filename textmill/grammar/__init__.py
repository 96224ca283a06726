"""Structured outputs: constraints compiled by llguidance (compiler.py, torch-free) and
applied to the logits as batched bitmasks (masks.py, the runner side)."""
