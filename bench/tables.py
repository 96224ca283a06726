"""Tables from result dicts: the console tables of `run.py` and the Markdown of `report.py`.

Both read the same JSON-shaped rows (bench/results/*.json), so the figures in
docs/performance.md are the ones a run printed. A row is one system at one concurrency:

    {"system", "concurrency", "tok_s", "others", "cores",            # the measurement
     "ready_s", "first_answer_s",                                     # the server it ran on
     "rss_load_mib", "rss_end_mib", "rss_peak_mib",
     "kv_tokens", "result": {LoadResult fields} or None}   # None: offline HF rows
"""
from __future__ import annotations

SYSTEM_ORDER = ("textmill", "llama-server", "llama-cpp-python", "hf-generate")
BASELINE = "llama-server"


def fmt(x: float | int | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    """A plain fixed-width table that is also valid Markdown."""
    widths = [max([len(str(h)), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _order(row: dict) -> tuple[int, int]:
    system = row["system"]
    rank = SYSTEM_ORDER.index(system) if system in SYSTEM_ORDER else len(SYSTEM_ORDER)
    return row["concurrency"], rank


def ratio(rows: list[dict], row: dict) -> str:
    """textmill's tok/s over this row's, at the same concurrency (for HF: batch size)."""
    tm = next((r["tok_s"] for r in rows if r["system"] == "textmill" and r["concurrency"] == row["concurrency"]),
              None)
    return f"{tm / row['tok_s']:.2f}x" if tm is not None and row["tok_s"] else "-"


def _get(row: dict, key: str):
    return (row.get("result") or {}).get(key)


MODEL_COLUMNS = ("system", "conc", "tok/s", "textmill/x", "TTFT p50", "TTFT p99", "lat p50", "stream tok/s",
                 "gen/req", "err", "ready s", "first s", "RSS load MiB", "RSS end MiB", "cores", "others %")


def model_rows(rows: list[dict], stamp: dict | None = None) -> list[list[str]]:
    out = []
    for r in sorted(rows, key=_order):
        res = r.get("result")
        cached = _get(r, "cached_fraction")
        cells = [r["system"], str(r["concurrency"]), fmt(r["tok_s"], 1), ratio(rows, r),
                 fmt(_get(r, "ttft_p50_s")), fmt(_get(r, "ttft_p99_s")), fmt(_get(r, "latency_p50_s")),
                 fmt(_get(r, "stream_tok_s_p50"), 1), fmt(_get(r, "mean_completion_tokens"), 1),
                 str(res["errors"]) if res else "-", fmt(r.get("ready_s"), 1), fmt(r.get("first_answer_s")),
                 fmt(r.get("rss_load_mib"), 0), fmt(r.get("rss_end_mib"), 0), fmt(r.get("cores")),
                 fmt(None if r.get("others") is None else 100 * r["others"], 0)]
        if cached and cached >= 0.005:  # prefix-cache hits: the shared-prefix workload
            cells[8] += f" ({100 * cached:.0f}% cached)"
        if stamp is not None:
            cells += [stamp_cell(stamp), machine_cell(stamp)]
        out.append(cells)
    return out


def model_table(model: dict, stamp: dict | None = None) -> str:
    """One model's rows; with `stamp`, each row also names the commit and the machine."""
    header = MODEL_COLUMNS + (("commit", "machine") if stamp is not None else ())
    return format_table(header, model_rows(model["rows"], stamp))


KV_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "f16": 2, "bf16": 2, "q8_0": 1.0625}


def model_heading(model: dict) -> str:
    """The line above a model's table: the file, its shapes, types, ending ids, KV sizes."""
    i = model["info"]
    kv = "; ".join(fmt_kv(s, i) for s in model.get("servers", []) if s.get("kv_tokens"))
    return (f"{model['key']}: {i['name']} ({i['architecture']}, {i['params_m']:.0f}M weights, "
            f"{i['file_mib']:.0f} MiB: {i['tensor_types']}; {i['layers']} layers, d={i['hidden']}, "
            f"{i['heads']}/{i['kv_heads']} heads, vocab {i['vocab']}); EOS banned: "
            f"{', '.join(map(str, model['eos_token_ids']))}" + (f"; KV: {kv}" if kv else ""))


def fmt_kv(server: dict, info: dict) -> str:
    """"textmill 16384 tokens (float16, 360 MiB)": the tokens and type the server logged, and
    the bytes they take (llama.cpp's sliding-window layers keep less: "<=")."""
    system, tokens, dtype = server["system"], server["kv_tokens"], server.get("kv_dtype")
    if dtype not in KV_BYTES:
        return f"{system} {tokens} tokens"
    # K values a token over the layers that keep a cache (Gemma 4: widths of their own, shared layers none)
    values = info.get("kv_row_values") or info["layers"] * info["kv_heads"] * info["head_dim"]
    mib = tokens * 2 * values * KV_BYTES[dtype] / 2**20
    bound = "<= " if system != "textmill" and info.get("sliding_window") else ""
    return f"{system} {tokens} tokens ({dtype}, {bound}{mib:.0f} MiB)"


def stamp_cell(stamp: dict) -> str:
    code = stamp.get("code", {})
    return f"`{code.get('commit', '?')[:7]}`" + ("+" if code.get("dirty") else "")


def machine_cell(stamp: dict) -> str:
    m = stamp.get("machine", {})
    cpu = (m.get("cpu") or "?").replace("Intel(R) Xeon(R)", "Xeon").replace("Processor", "").strip()
    fam = f" {m['family']}/{m['model']}" if m.get("family") else ""
    return f"{cpu}{fam}, {m.get('cores', '?')}c"


SUMMARY_COLUMNS = ("model", "weights", "C=1 textmill", "C=1 llama-server", "ratio", "C=16 textmill",
                   "C=16 llama-server", "ratio", "TTFT p50 @16 tm / ls", "ready s tm / ls",
                   "RSS end MiB tm / ls")


def _pick(rows: list[dict], system: str, c: int) -> dict | None:
    return next((r for r in rows if r["system"] == system and r["concurrency"] == c), None)


def _pair(a: dict | None, b: dict | None, get, digits: int) -> str:
    return f"{fmt(get(a) if a else None, digits)} / {fmt(get(b) if b else None, digits)}"


def summary_rows(models: list[dict]) -> list[list[str]]:
    """One line per model: textmill against llama-server at 1 and 16 streams."""
    out = []
    for m in models:
        rows = m["rows"]
        cells = [m["key"], f"{m['info']['params_m']:.0f}M"]
        for c in (1, 16):
            tm, ls = _pick(rows, "textmill", c), _pick(rows, BASELINE, c)
            cells += [fmt(tm and tm["tok_s"], 1), fmt(ls and ls["tok_s"], 1),
                      f"{tm['tok_s'] / ls['tok_s']:.2f}x" if tm and ls and ls["tok_s"] else "-"]
        tm16, ls16 = _pick(rows, "textmill", 16), _pick(rows, BASELINE, 16)
        tm_any = next((r for r in rows if r["system"] == "textmill"), None)
        ls_any = next((r for r in rows if r["system"] == BASELINE), None)
        cells += [_pair(tm16, ls16, lambda r: _get(r, "ttft_p50_s"), 2),
                  _pair(tm_any, ls_any, lambda r: r.get("ready_s"), 1),
                  _pair(tm_any, ls_any, lambda r: r.get("rss_end_mib"), 0)]
        out.append(cells)
    return out


def summary_table(models: list[dict]) -> str:
    return format_table(SUMMARY_COLUMNS, summary_rows(models))
