"""Packing a GGUF file's tensors (pack_gguf): this tree's build against another revision's.

A server's start on a large file is mostly this conversion (an 8B Q4_K_M: ~15 of its ~20 s
to ready), so it is timed apart from the load: every weight tensor of the files that the
runner would pack (each in the form CodesRef.form names), packed by both builds in
alternation, best of --rounds wall times with the machine's threads, and the packed bytes
compared (a faster pack must give the kernels the same bytes).

    python bench/pack_ab.py --rev HEAD~1 --models smollm2 synthetic-1b
    python bench/pack_ab.py --rev HEAD~1 --model path/to/file.gguf

Results: bench/results/pack_ab-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import models  # noqa: E402
from revision import build_at  # noqa: E402
from stamp import write_result  # noqa: E402

from textmill.kernels import load  # noqa: E402
from textmill.loader.gguf import model_tensors  # noqa: E402
from textmill.loader.gguf_file import GGUFFile  # noqa: E402
from textmill.loader.group_codes import CodesRef, convertible  # noqa: E402
from textmill.loader.load import read_model_config  # noqa: E402
from textmill.runner.qlinear import width_form  # noqa: E402


def weight_refs(path: Path) -> list[tuple[str, CodesRef]]:
    """The file's 2-D block-quantized tensors the runner packs, in file order (the token
    embedding only where it is also the head: otherwise it is looked up in the file)."""
    gguf = GGUFFile(path)
    config = read_model_config(path)
    tensors = model_tensors(gguf, config)
    untied_embedding = any(t.name == "output.weight" for t in tensors)
    return [(t.name, CodesRef(t.data, t.qtype, t.shape)) for t in tensors
            if len(t.shape) == 2 and convertible(t.qtype, t.shape) and t.qtype.name not in ("F32", "F16", "BF16")
            and not (untied_embedding and t.name == "token_embd.weight")]


def pack(ext, ref: CodesRef, form: str | None = None) -> torch.Tensor:
    empty = torch.empty(0, dtype=torch.long)
    return ext.pack_gguf(form or ref.form, [ref.flat_bytes()], [int(ref.qtype)], [empty], ref.shape[1], [ref.grid()])


def form_for(ext, form: str) -> str:
    """`form`, or, where a build predates the k-quants' own forms (q4k, q5k, q6k), the form of
    their width it packed them into (q4, q5, q6): that build's way of packing the type."""
    try:
        ext.packed_bytes(form, 16, 256)
    except RuntimeError:
        return width_form(form)
    return form


def measure(old, new, path: Path, rounds: int) -> list[dict]:
    """Per (type, form): the tensors' total pack time for each build, and whether every
    tensor's bytes were equal."""
    by_kind: dict[tuple[str, str], list[CodesRef]] = collections.defaultdict(list)
    for name, ref in weight_refs(path):
        try:
            pack(new, ref)
        except RuntimeError as exc:  # a scale past a half: the runner takes the 8-bit path
            if "half range" not in str(exc):
                raise
            print(f"{path.name}: {name} skipped ({ref.source} scales past a half's range)")
            continue
        by_kind[(ref.source, ref.form)].append(ref)
    rows = []
    for (source, form), refs in sorted(by_kind.items()):
        forms = {"old": form_for(old, form), "new": form}
        same = forms["old"] == form and all(torch.equal(pack(old, r), pack(new, r)) for r in refs)
        best = {"old": float("inf"), "new": float("inf")}
        for _ in range(rounds):
            for name, ext in (("old", old), ("new", new)):
                t = time.perf_counter()
                for r in refs:
                    pack(ext, r, forms[name])
                best[name] = min(best[name], time.perf_counter() - t)
        mb = sum(r.raw.nbytes for r in refs) / 1e6
        rows.append({"file": path.name, "type": source, "form": form, "old_form": forms["old"], "tensors": len(refs), "mb": mb,
                     "old_s": best["old"], "new_s": best["new"], "new_over_old": best["new"] / best["old"],
                     "new_gb_s": mb / 1e3 / best["new"], "bitwise_equal": same})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the git revision to compare against (e.g. HEAD~1)")
    ap.add_argument("--models", nargs="*", default=["smollm2", "gemma3", "synthetic-1b"],
                    help=f"bench models ({', '.join(models.MATRIX + models.EXTRA)})")
    ap.add_argument("--model", type=Path, action="append", default=[], help="a GGUF file (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    paths = [models.load(key).path for key in args.models] + args.model
    new = load("quant")
    with tempfile.TemporaryDirectory() as scratch:
        old = build_at(args.rev, Path(scratch), "quant")
        results = [row for path in paths for row in measure(old, new, path, args.rounds)]
    print(f"\nthreads {torch.get_num_threads()}; best of {args.rounds} rounds, wall time\n")
    print(f"| file | type -> form | tensors | MB | {args.rev} s | this tree s | new / old | GB/s | bitwise equal |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        form = r["form"] if r["old_form"] == r["form"] else f"{r['form']} (old: {r['old_form']})"
        print(f"| {r['file']} | {r['type']} -> {form} | {r['tensors']} | {r['mb']:.0f} | {r['old_s']:.3f} | "
              f"{r['new_s']:.3f} | {r['new_over_old']:.2f} | {r['new_gb_s']:.2f} | "
              f"{'yes' if r['bitwise_equal'] else 'NO' if r['old_form'] == r['form'] else 'other form'} |")
    write_result("pack_ab", {"rev": args.rev, "threads": torch.get_num_threads(), "rounds": args.rounds,
                             "results": results})
    return 0 if all(r["bitwise_equal"] for r in results if r["old_form"] == r["form"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
