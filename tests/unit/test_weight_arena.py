"""A GGUF model's weights are packed straight into mappings that ask for 2 MiB pages
(runner/weight_arena.py), one after the other, and the model computes the same bits from
there as from tensors of their own."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from textmill import kernels
from textmill.config import CacheConfig
from textmill.loader import load_model
from textmill.runner import ModelRunner
from textmill.runner import file_weights
from textmill.runner.qlinear import QLinear
from textmill.runner.weight_arena import ALIGN, HUGE_PAGE, WeightArena
from tests.unit.test_file_weights import VOCAB, _prompt_logprobs, _write

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    assert kernels.load("quant") is not None, "the C++ kernels did not build"
    path = tmp_path_factory.mktemp("gguf") / "every-type-llama.gguf"
    _write(path, "llama")
    return path


def _runner(path: Path) -> ModelRunner:
    loaded = load_model(path, codes=True)
    return ModelRunner(loaded.model, loaded.config, CacheConfig(16, 8), file_weights=loaded)


def _mapping_of(address: int) -> list[str]:
    """The /proc/self/smaps entry (header and fields) of the mapping holding `address`."""
    entry: list[str] = []
    found = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):  # a mapping's header: start-end perms ...
            if found:
                break
            start, end = (int(x, 16) for x in head.split("-"))
            found = start <= address < end
            entry = []
        entry.append(line)
    assert found, f"no mapping holds {address:#x}"
    return entry


def test_packed_weights_sit_side_by_side_on_huge_page_bounds(gguf_path):
    runner = _runner(gguf_path)
    linears = [m for m in runner.model.modules() if type(m) is QLinear]
    assert len(linears) > 10 and runner.model.lm_head in linears
    # every weight packed from the file, in one mapping (the model is far below a chunk),
    # one after the other in packing order: no gap past a cache line's alignment
    assert len({m.packed.untyped_storage().data_ptr() for m in linears}) == 1
    spans = sorted((m.packed.data_ptr(), m.packed.data_ptr() + m.packed.numel()) for m in linears)
    assert spans[0][0] % HUGE_PAGE == 0 and all(start % ALIGN == 0 for start, _ in spans)
    assert all(0 <= start - end < ALIGN for (_, end), (start, _) in zip(spans, spans[1:]))
    if THP.exists() and "[never]" not in THP.read_text():
        # Asked for huge pages: the kernel may still give small ones (none free), but the
        # mapping is eligible for them.
        assert ["THPeligible:", "1"] in [line.split() for line in _mapping_of(spans[0][0])]


def test_the_arena_changes_no_bit_of_the_output(gguf_path, monkeypatch):
    tokens = random.Random(1).choices(range(VOCAB), k=40)
    in_arena = _prompt_logprobs(_runner(gguf_path), tokens)
    monkeypatch.setattr(file_weights, "WeightArena", lambda: None)  # each weight a tensor of its own
    runner = _runner(gguf_path)
    assert len({m.packed.untyped_storage().data_ptr() for m in runner.model.modules() if type(m) is QLinear}) > 1
    assert torch.equal(_prompt_logprobs(runner, tokens), in_arena)


def test_the_arena_starts_a_new_mapping_when_a_weight_does_not_fit():
    arena = WeightArena(chunk_bytes=HUGE_PAGE)
    a, b = arena.take(1000), arena.take(HUGE_PAGE - 1024)  # b fits after a, on a cache line
    assert b.data_ptr() == a.data_ptr() + 1024 and a.data_ptr() % HUGE_PAGE == 0
    c = arena.take(10)  # no room left in the first mapping
    assert c.untyped_storage().data_ptr() != a.untyped_storage().data_ptr() and c.data_ptr() % HUGE_PAGE == 0
    big = arena.take(3 * HUGE_PAGE + 5)  # larger than a chunk: a mapping of its own size
    assert big.numel() == 3 * HUGE_PAGE + 5 and big.data_ptr() % HUGE_PAGE == 0
    big.fill_(7)
    assert int(big[-1]) == 7 and int(c.sum()) == 0  # writable, and zeroed until written
