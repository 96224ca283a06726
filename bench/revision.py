"""A kernel extension as it was at another git revision, built for side-by-side timing."""
from __future__ import annotations

import subprocess
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
CSRC = "textmill/kernels/csrc"


def build_at(rev: str, scratch: Path, name: str, extra_flags: tuple[str, ...] = ()) -> ModuleType:
    """kernels/csrc/<name>.cpp and the headers at `rev`, compiled into `scratch` as a module
    of its own (importable beside this tree's build of the same extension), with
    `extra_flags` after the usual ones."""
    from torch.utils import cpp_extension

    from textmill.kernels.build import CFLAGS

    files = subprocess.run(["git", "ls-tree", "--name-only", rev, f"{CSRC}/"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        if f.endswith((".cpp", ".h")):
            src = subprocess.run(["git", "show", f"{rev}:{f}"], cwd=ROOT, check=True, capture_output=True).stdout
            (scratch / Path(f).name).write_bytes(src)
    module = f"textmill_{name}_ab_{rev.replace('~', '_').replace('^', '_')}"
    return cpp_extension.load(name=module, sources=[str(scratch / f"{name}.cpp")], extra_cflags=[*CFLAGS, *extra_flags],
                              extra_ldflags=["-fopenmp"], build_directory=str(scratch))
