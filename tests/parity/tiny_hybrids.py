"""The tiny hybrids' Q8_0 files by family (tiny_qwen35.py, tiny_lfm2.py, tiny_granite_hybrid.py,
tiny_nemotron_h.py, tiny_falcon_h1.py), for the runner's and the server's tests: each family's random model, the source
rounded to the file, written as llama.cpp's converter writes it."""
from __future__ import annotations

import functools
from pathlib import Path

from tests.parity import tiny_falcon_h1, tiny_granite_hybrid, tiny_lfm2, tiny_nemotron_h, tiny_qwen35
from tests.parity.tiny_models import train_tokenizer

# family -> (make the transformers model, round it to the Q8_0 file, write the file)
FAMILIES = {
    "qwen35": (tiny_qwen35.tiny_qwen35_hf, tiny_qwen35.round_to_file, tiny_qwen35.write_qwen35_gguf),
    "lfm2": (tiny_lfm2.tiny_lfm2_hf, tiny_lfm2.round_to_file, tiny_lfm2.write_lfm2_gguf),
    "qwen35moe": (functools.partial(tiny_qwen35.tiny_qwen35_hf, moe=True), tiny_qwen35.round_to_file,
                  tiny_qwen35.write_qwen35_gguf),
    "lfm2moe": (functools.partial(tiny_lfm2.tiny_lfm2_hf, moe=True), tiny_lfm2.round_to_file,
                tiny_lfm2.write_lfm2_gguf),
    "qwen3next": (functools.partial(tiny_qwen35.tiny_qwen35_hf, next=True), tiny_qwen35.round_to_file,
                  tiny_qwen35.write_qwen35_gguf),
    "granitehybrid": (tiny_granite_hybrid.tiny_granite_hybrid_hf, tiny_granite_hybrid.round_to_file,
                      tiny_granite_hybrid.write_granite_hybrid_gguf),
    "granitehybridmoe": (functools.partial(tiny_granite_hybrid.tiny_granite_hybrid_hf, moe=True),
                         tiny_granite_hybrid.round_to_file, tiny_granite_hybrid.write_granite_hybrid_gguf),
    "nemotron_h": (tiny_nemotron_h.tiny_nemotron_h_hf, tiny_granite_hybrid.round_to_file,
                   tiny_nemotron_h.write_nemotron_h_gguf),
    "nemotron_h_moe": (functools.partial(tiny_nemotron_h.tiny_nemotron_h_hf, moe=True),
                       tiny_granite_hybrid.round_to_file, tiny_nemotron_h.write_nemotron_h_gguf),
    # The file holds each weight times its multiplier, rounded: the source rounded as Granite's is near it.
    "falcon_h1": (tiny_falcon_h1.tiny_falcon_h1_hf, tiny_granite_hybrid.round_to_file,
                  tiny_falcon_h1.write_falcon_h1_gguf),
}


def tiny_file(family: str, folder: Path) -> Path:
    """The family's tiny random model as its Q8_0 file in `folder`, the source rounded to it."""
    make, round_to_file, write = FAMILIES[family]
    hf = make()
    round_to_file(hf)
    return write(folder / f"tiny-{family}.gguf", hf, train_tokenizer(), q8_0=True)
