"""Result files -> the Markdown tables of docs/performance.md.

One table per model, the rows of every given file together, each row stamped with the
commit it measured (`+`: the tree had uncommitted changes) and the machine; then one
summary line per model and file, and the runs' commands, times and full machine names.

    python bench/report.py                                  # bench/results/latest.json
    python bench/report.py bench/results/20261203-*.json > /tmp/tables.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stamp as stamps  # noqa: E402
import tables  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load(paths: list[Path]) -> list[dict]:
    docs = []
    for path in paths:
        doc = json.loads(path.read_text())
        if "models" not in doc:  # a result file of the single-model bench (before the matrix)
            raise ValueError(f"{path}: no 'models' (written by an older bench/run.py)")
        docs.append(doc)
    return docs


def by_model(docs: list[dict]) -> dict[str, list[tuple[dict, dict]]]:
    """model key -> [(stamp, model result)] in the order of the files."""
    out: dict[str, list[tuple[dict, dict]]] = {}
    for doc in docs:
        for model in doc["models"]:
            out.setdefault(model["key"], []).append((doc["stamp"], model))
    return out


def model_section(key: str, runs: list[tuple[dict, dict]]) -> str:
    """The heading line (from the latest run) and one table of every run's rows."""
    header = tables.MODEL_COLUMNS + ("commit", "machine")
    rows = [cells for s, model in runs for cells in tables.model_rows(model["rows"], s)]
    return f"#### {key}\n\n{tables.model_heading(runs[-1][1])}\n\n{tables.format_table(header, rows)}\n"


def summary_section(docs: list[dict]) -> str:
    header = tables.SUMMARY_COLUMNS + ("commit", "machine")
    rows = []
    for doc in docs:
        for cells in tables.summary_rows(doc["models"]):
            rows.append([*cells, tables.stamp_cell(doc["stamp"]), tables.machine_cell(doc["stamp"])])
    return tables.format_table(header, rows) + "\n"


def runs_section(docs: list[dict]) -> str:
    lines = []
    for doc in docs:
        s = doc["stamp"]
        dirty = f", uncommitted changes in {len(s['code']['dirty_files'])} files" if s["code"]["dirty"] else ""
        lines.append(f"- {s['time_utc']}: `{s['command']}` at commit `{s['code']['commit']}`{dirty}; "
                     f"{stamps.machine_label(s['machine'])}, {s['machine'].get('mem_gib')} GiB"
                     + "".join(f"; FAILED {p.splitlines()[0]}" for p in doc.get("problems", [])))
    return "\n".join(lines) + "\n"


def render(docs: list[dict]) -> str:
    parts = [model_section(k, runs) for k, runs in by_model(docs).items()]
    parts += ["Summary (`tm`: textmill, `ls`: llama-server; tok/s in total over all streams):\n",
              summary_section(docs), "Runs:\n", runs_section(docs)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path, default=[RESULTS / "latest.json"])
    args = p.parse_args(argv)
    print(render(load(args.files)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
