"""textmill's tokenizer: one Tokenizer interface over GGUF vocabularies and Hugging Face
tokenizer.json folders.

    core.py           Tokenizer, TokenizerParts, IncrementalDecoder; FIM and end-of-turn texts
    byte_level.py     byte-level BPE: the byte alphabet, llama.cpp's pre-tokenizer regexes
    sentencepiece.py  SentencePiece BPE: U+2581 and byte fallback, merges from scores
    gguf.py           a GGUF file's metadata (read by loader/gguf_file.py) -> TokenizerParts
    cache.py          the per-user cache of tokenizers built from GGUF files
    hf.py             a folder's tokenizer.json -> TokenizerParts

Imports go one way: core <- byte_level, sentencepiece <- gguf (+ cache), hf <- this file.
No module here imports torch.
"""
from __future__ import annotations

from pathlib import Path

from textmill.tokenizer.core import FimTokens, IncrementalDecoder, Tokenizer, TokenizerParts
from textmill.tokenizer.gguf import load_gguf_tokenizer
from textmill.tokenizer.hf import load_hf_tokenizer

__all__ = ["FimTokens", "IncrementalDecoder", "Tokenizer", "TokenizerParts", "load_gguf_tokenizer",
           "load_hf_tokenizer", "load_tokenizer"]


def load_tokenizer(path: str | Path, *, cache_dir: str | Path | None = None, cache: bool = True) -> Tokenizer:
    """A .gguf file's tokenizer (cached as load_gguf_tokenizer says), or a folder's tokenizer.json."""
    path = Path(path)
    return load_hf_tokenizer(path) if path.is_dir() else load_gguf_tokenizer(path, cache_dir=cache_dir, cache=cache)
