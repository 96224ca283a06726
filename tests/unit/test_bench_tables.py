"""bench/: the tables, the result-file report, the stamps and the request body (no servers)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import models  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import servers  # noqa: E402
import stamp  # noqa: E402
import tables  # noqa: E402
from workload import Workload, request_body  # noqa: E402

STAMP = {"code": {"commit": "abcdef123456", "dirty": True, "dirty_files": ["x.py"]},
         "machine": {"cpu": "AMD EPYC", "family": "26", "model": "2", "cores": 2, "mem_gib": 23.4,
                     "simd": ["avx2", "avx512f", "avx512_vnni"]},
         "time_utc": "2026-12-03T12:00:00+00:00", "command": "python bench/run.py --quick"}
INFO = {"architecture": "llama", "name": "Tiny", "params_m": 135.0, "file_mib": 94.0, "layers": 30,
        "hidden": 576, "heads": 9, "kv_heads": 3, "head_dim": 64, "context": 8192, "vocab": 49152,
        "sliding_window": None, "tensor_types": "Q4_1 69%, Q8_0 31%", "eos_token_ids": [0, 2]}


def _row(system: str, c: int, tok_s: float, ttft: float) -> dict:
    result = {"ttft_p50_s": ttft, "ttft_p99_s": ttft, "latency_p50_s": 1.0, "stream_tok_s_p50": 50.0,
              "mean_completion_tokens": 64.0, "errors": 0, "cached_fraction": 0.0, "total_tok_s": tok_s}
    return {"system": system, "concurrency": c, "tok_s": tok_s, "others": 0.01, "cores": 1.9,
            "ready_s": 2.5, "first_answer_s": 0.031,
            "rss_load_mib": 500.0, "rss_end_mib": 520.0, "rss_peak_mib": 600.0,
            "kv_tokens": 16384, "result": result}


MODEL = {"key": "smollm2", "path": "/x.gguf", "info": INFO, "eos_token_ids": [0, 2],
         "servers": [{"system": "textmill", "kv_tokens": 16384, "kv_dtype": "float32"},
                     {"system": "llama-server", "kv_tokens": 16384, "kv_dtype": "f16"}],
         "rows": [_row("llama-server", 16, 100.0, 3.0), _row("textmill", 1, 150.0, 0.03),
                  _row("textmill", 16, 400.0, 0.25), _row("llama-server", 1, 75.0, 0.2)]}


def test_model_table_ratios_and_order():
    lines = tables.model_table(MODEL).splitlines()
    assert lines[0].split("|")[1].strip() == "system" and "RSS end MiB" in lines[0]
    body = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]]
    assert [(r[0], r[1], r[3]) for r in body] == [
        ("textmill", "1", "1.00x"), ("llama-server", "1", "2.00x"),
        ("textmill", "16", "1.00x"), ("llama-server", "16", "4.00x")]
    assert body[0][10:15] == ["2.5", "0.03", "500", "520", "1.90"]  # ready s, first s, RSS load, RSS end, cores
    assert body[0][8] == "64.0"  # no "cached" note without prefix-cache hits


def test_heading_names_ending_ids_and_kv():
    heading = tables.model_heading(MODEL)
    assert "EOS banned: 0, 2" in heading
    # 16384 tokens x 2 (K, V) x 30 layers x 3 heads x 64: 720 MiB in float32, 360 in f16
    assert "textmill 16384 tokens (float32, 720 MiB); llama-server 16384 tokens (f16, 360 MiB)" in heading
    # Gemma 4's E2B: the 15 layers that keep a cache, 12 x 1 x 256 + 3 x 1 x 512 values a token
    gemma4 = dict(MODEL, info=dict(INFO, layers=35, kv_heads=1, head_dim=256, kv_row_values=4608))
    assert "textmill 16384 tokens (float32, 576 MiB)" in tables.model_heading(gemma4)


def test_summary_row():
    (row,) = tables.summary_rows([MODEL])
    assert row[:8] == ["smollm2", "135M", "150.0", "75.0", "2.00x", "400.0", "100.0", "4.00x"]
    assert row[8] == "0.25 / 3.00"


def test_report_stamps_every_row(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"stamp": STAMP, "models": [MODEL], "problems": []}))
    text = report.render(report.load([path, path]))
    table = [line for line in text.splitlines() if line.split("|")[1:2] and line.split("|")[1].strip() == "textmill"]
    assert len(table) == 4  # two files of two textmill rows each, in one table
    assert all("`abcdef1`+" in line and "AMD EPYC 26/2, 2c" in line for line in table)
    assert "#### smollm2" in text and "`python bench/run.py --quick`" in text


def test_machine_label_and_cpuinfo():
    info = stamp.cpuinfo("processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 26\nmodel\t\t: 2\n"
                         "flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n\nprocessor\t: 1\n")
    m = stamp.machine_stamp(info)
    assert m["simd"] == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert stamp.machine_label(m).startswith("AMD EPYC (fam 26 model 2), ") and m["cpu"] == "AMD EPYC"
    assert stamp.machine_label(m).endswith("avx512 vnni bf16")


def test_changed_files_from_porcelain():
    assert stamp.changed_files("M bench/run.py\n M docs/x.md\nR  a.py -> b.py\n") == \
        ["bench/run.py", "docs/x.md", "a.py -> b.py"]


def test_kv_capacity_from_logs(tmp_path):
    log = tmp_path / "tm.log"
    log.write_text("INFO textmill: loaded x (llama, float32 on cpu) in 2.0s; KV cache 1024 blocks of 16 tokens\n")
    assert servers.kv_capacity("textmill", log) == (16384, None)
    log.write_text("INFO textmill: plan: cpu, float32 activations, the file's own blocks as 4/8-bit codes, "
                   "textmill's C++ kernels, KV cache float16, all threads\n" + log.read_text())
    assert servers.kv_capacity("textmill", log) == (16384, "float16")
    log.write_text("0.09.554.033 I srv    load_model: initializing, n_slots = 16, n_ctx_slot = 1024, "
                   "kv_unified = 'false'\n")
    assert servers.kv_capacity("llama-server", log)[0] == 16384
    assert servers.kv_capacity("llama-server", tmp_path / "missing.log") == (None, None)


def test_request_bans_every_ending_id():
    body = request_body(Workload(eos_token_ids=(1, 106)), "m", 0)
    assert body["logit_bias"] == {"1": -100, "106": -100} and body["ignore_eos"] is True
    assert request_body(Workload(), "m", 0)["logit_bias"] == {"0": -100, "2": -100}  # SmolLM2's


def test_textmill_kv_matches_llama_servers_tokens():
    info = models.ModelInfo(**{**INFO, "layers": 18, "kv_heads": 1, "head_dim": 256, "context": 32768,
                               "eos_token_ids": (1, 106)})
    model = models.BenchModel("gemma3", Path("/g.gguf"), info)
    args = argparse.Namespace(kv_tokens=16384, textmill_args="")
    for dtype, size in (("float32", 4), ("float16", 2), (None, 4)):
        flags = run.kv_args(model, args, dtype)
        per_block = 16 * info.kv_bytes_per_token(size)  # K and V, 16-token blocks
        assert int(float(flags[1]) * 2**30 // per_block) * 16 == 16384  # textmill's own sizing arithmetic
        assert flags[2:] == ["--max-model-len", "16384"]  # the cache must hold one full context
    assert run.kv_args(model, argparse.Namespace(kv_tokens=0, textmill_args=""), "float16") == []


def test_matrix_and_model_flags():
    args = run.parse_args(["--quick", "--model", "/tmp/a.gguf"])
    assert args.model_keys == ["smollm2", "gemma3", "synthetic-1b", "synthetic-qwen3", "/tmp/a.gguf"]
    assert (args.rounds, args.min_requests, args.kv_tokens) == (1, 2, 16 * 1024)
    assert args.systems == ["textmill", "llama-server"]
    assert run.parse_args(["--models", "gemma3", "--with-64"]).model_keys == ["gemma3"]
    assert run.parse_args(["--gguf", "/tmp/b.gguf"]).model_keys == ["/tmp/b.gguf"]
