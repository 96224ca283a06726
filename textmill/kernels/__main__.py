"""`python -m textmill.kernels`: build every C++ extension now (make install runs this)."""
import logging
import sys
import time

from textmill.kernels.build import build_all

logging.basicConfig(level=logging.INFO, format="%(message)s")
start = time.perf_counter()
results = build_all(verbose="-v" in sys.argv)
for name, ok in results.items():
    print(f"kernels {name}: {'built' if ok else 'UNAVAILABLE (the torch path will be used)'}")
print(f"kernels ready in {time.perf_counter() - start:.1f} s")
