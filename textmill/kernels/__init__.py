"""kernels/: C++ CPU kernels for the runner, compiled on the machine that runs them.

The runner's hot path on a small model is dominated by two things torch's eager CPU ops do
poorly: weight-only 4/8-bit matmuls on CPUs without AMX/VNNI-friendly kernels (torch's
int4 CPU kernel is scalar for float32 activations), and dozens of tiny elementwise ops per
layer, each a few microseconds of dispatch. Each extension here is one C++ file in csrc/
with its own module, built with `-O3 -march=native` (so the compiler picks the best vector
ISA of this very machine) by torch.utils.cpp_extension into a per-user cache, once: `make
install` builds them ahead of time (`python -m textmill.kernels`), later loads reuse the
build. Where a build fails (no compiler, say), load() returns None and the runner keeps
its pure-torch path: the kernels make textmill faster, never required.
"""
from textmill.kernels.build import KERNEL_NAMES, build_all, load

__all__ = ["KERNEL_NAMES", "build_all", "load"]
