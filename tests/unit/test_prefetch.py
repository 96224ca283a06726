"""The page-cache prefetch the CLI starts before torch imports (loader/prefetch.py)."""
from __future__ import annotations

import os

import pytest

from textmill.loader import prefetch


def test_model_files_are_the_gguf_or_a_folders_safetensors(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("b.safetensors", "a.safetensors", "config.json"):
        (folder / name).write_bytes(b"{}")
    assert prefetch.model_files(gguf) == [gguf]
    assert prefetch.model_files(folder) == [folder / "a.safetensors", folder / "b.safetensors"]
    assert prefetch.model_files(tmp_path / "missing.gguf") == []


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this OS")
def test_prefetch_reads_a_file_ahead_and_leaves_alone_what_it_should(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(os.urandom(1 << 20))
    thread = prefetch.prefetch_in_background(gguf)
    assert thread is not None and thread.daemon
    thread.join(timeout=30)
    assert prefetch.advise_will_need([gguf, tmp_path / "gone.gguf"]) == 1 << 20  # a missing file is skipped
    assert prefetch.prefetch_in_background(tmp_path / "missing.gguf") is None
    # more than half the memory available: reading it ahead would evict what the load just read
    monkeypatch.setattr(prefetch, "available_bytes", lambda: (1 << 21) - 1)
    assert prefetch.prefetch_in_background(gguf) is None
    monkeypatch.setattr(prefetch, "available_bytes", lambda: 1 << 21)
    assert prefetch.prefetch_in_background(gguf) is not None


def test_available_bytes_reads_meminfo():
    avail = prefetch.available_bytes()
    if os.path.exists("/proc/meminfo"):
        assert avail is not None and avail > 0


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this OS")
def test_a_folder_with_a_dangling_link_is_left_to_the_load(tmp_path):
    # Hugging Face snapshot folders are links into a blob store; a broken one must not stop
    # the CLI before the load can say what is wrong.
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "blobs" / "gone")
    assert prefetch.prefetch_in_background(tmp_path) is None


def test_the_cli_reads_ahead_only_where_the_model_loads():
    from textmill.cli import _loads_here, build_parser

    parse = build_parser().parse_args
    assert _loads_here(parse(["serve", "m.gguf"]))
    assert _loads_here(parse(["serve", "m.gguf", "--replicas", "2"]))  # local replicas share the page cache
    assert not _loads_here(parse(["serve", "m.gguf", "--ray-address", "ray://head:10001"]))
    assert not _loads_here(parse(["serve", "m.gguf", "--min-replicas", "3", "--max-replicas", "2"]))  # about to fail


def test_the_read_ahead_and_the_load_resolve_the_same_model_path(tmp_path, monkeypatch):
    """One resolver for both (loader/bundled.py): the CLI reads ahead the file the load opens."""
    from textmill.loader.bundled import bundled_model_path, resolve_model_path
    from textmill.wiring import model_path

    monkeypatch.setenv("HOME", str(tmp_path))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model_path("~/m.gguf") == f == model_path("~/m.gguf")
    assert resolve_model_path(None) == bundled_model_path() == model_path(None)
