"""The per-user cache of built GGUF tokenizers.

A built tokenizer is stored under a hash of the file's metadata region and of the
code that builds it, so that neither a changed file nor a changed builder is ever served a
stale one. An entry is one .npz (no pickles): a JSON header with TokenizerParts' small
fields, the backend's JSON (Tokenizer.to_str) and the byte table as lengths plus one blob.
Loading it skips reading the metadata strings, the merges and the byte table; what is left
is mostly Tokenizer.from_str, about 1 s for Gemma 3's BPE. Rebuilding that BPE from lists
kept in a format of our own measured no faster (making 515k Python tuples costs what serde
does), so the backend's own JSON it is, with its merges written as "a b" strings where no
merged piece holds a space (compact_merges): `tokenizers` reads that older form ~0.35 s
faster on Gemma 3's 515k merges (1.05 s against 1.39) than the pairs to_str() writes. The zip's CRC-32 catches a damaged entry, which is
then rebuilt; a directory that cannot be written is simply not used.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as Backend

from textmill.tokenizer.core import FimTokens, TokenizerParts

log = logging.getLogger("textmill.tokenizer")

CACHE_DIR_ENV = "TEXTMILL_CACHE_DIR"
CACHE_FORMAT = 3  # 3: the header holds newline_runs


def default_cache_dir() -> Path | None:
    """$TEXTMILL_CACHE_DIR/tokenizers, else $XDG_CACHE_HOME/textmill/tokenizers, else
    ~/.cache/textmill/tokenizers; None without a home directory."""
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root) / "tokenizers"
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:
            return None
    return Path(base) / "textmill" / "tokenizers"


def load_entry(entry: Path, key: str) -> TokenizerParts | None:
    try:
        # Opened here, not by np.load, which leaves its file open when the content is bad.
        with entry.open("rb") as f:
            npz = np.load(f, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with npz:
                header = json.loads(npz["header"].tobytes())
                backend_json = npz["backend"].tobytes().decode("utf-8")
                lengths = npz["token_lengths"]
                blob = npz["token_bytes"].tobytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except Exception as exc:  # a damaged entry fails in many ways; rebuild it
        log.warning("tokenizer cache entry %s is unreadable (%s: %s); rebuilding", entry, type(exc).__name__, exc)
        return None
    try:
        if header.get("format") != CACHE_FORMAT or header.get("key") != key:
            raise ValueError("it belongs to another file or format")
        ends = np.cumsum(lengths, dtype=np.int64).tolist()
        if ends and ends[-1] != len(blob):
            raise ValueError("its byte table does not add up")
        table = tuple(blob[a:b] for a, b in zip([0, *ends], ends))
        fim = header["fim"]
        return TokenizerParts(
            backend=Backend.from_str(backend_json),
            token_bytes=table,
            bos_token_id=header["bos_token_id"],
            eos_token_id=header["eos_token_id"],
            eos_token_ids=frozenset(header["eos_token_ids"]),
            add_bos=header["add_bos"],
            add_eos=header["add_eos"],
            fim=FimTokens(*fim) if fim is not None else None,
            strip_leading_space=header["strip_leading_space"],
            newline_runs=tuple((length, token) for length, token in header["newline_runs"]),
        )
    except Exception as exc:
        log.warning("tokenizer cache entry %s is unusable (%s: %s); rebuilding", entry, type(exc).__name__, exc)
        return None


def compact_merges(backend_json: str) -> str:
    """The backend's JSON with a BPE model's merges as "a b" strings instead of [a, b] pairs:
    the same tokenizer, read faster. Unchanged when a piece holds a space (the string
    form splits at the first one) or the model is not BPE."""
    doc = json.loads(backend_json)
    model = doc.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or not all(isinstance(m, list) and len(m) == 2 for m in merges):
        return backend_json
    if any(" " in a or " " in b for a, b in merges):
        return backend_json
    model["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(doc, ensure_ascii=False)


def _entry_arrays(key: str, parts: TokenizerParts) -> dict[str, np.ndarray]:
    fim = parts.fim
    header = {
        "format": CACHE_FORMAT, "key": key,
        "bos_token_id": parts.bos_token_id, "eos_token_id": parts.eos_token_id,
        "eos_token_ids": sorted(parts.eos_token_ids), "add_bos": parts.add_bos, "add_eos": parts.add_eos,
        "fim": [fim.prefix, fim.suffix, fim.middle] if fim is not None else None,
        "strip_leading_space": parts.strip_leading_space,
        "newline_runs": [list(run) for run in parts.newline_runs],
    }
    return {
        "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
        "backend": np.frombuffer(compact_merges(parts.backend.to_str()).encode("utf-8"), dtype=np.uint8),
        "token_lengths": np.fromiter(map(len, parts.token_bytes), dtype=np.uint32, count=len(parts.token_bytes)),
        "token_bytes": np.frombuffer(b"".join(parts.token_bytes), dtype=np.uint8),
    }


def store_entry(entry: Path, key: str, parts: TokenizerParts) -> None:
    """Write the entry under a temporary name and rename it: readers, other processes
    included, see a whole entry or none."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **_entry_arrays(key, parts))
        os.replace(tmp, entry)
        tmp = None
    except OSError as exc:  # read-only, full, not a directory, ...: no cache, same tokenizer
        log.info("not caching the tokenizer in %s: %s", entry.parent, exc)
    except Exception as exc:  # caching is an optimisation: never a reason to fail a start
        log.warning("not caching the tokenizer in %s: %s: %s", entry.parent, type(exc).__name__, exc)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
