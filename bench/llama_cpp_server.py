"""Run llama-cpp-python's OpenAI server, optionally without ggml's extra buffer types.

    .venv-bench/bin/python bench/llama_cpp_server.py [--no-extra-bufts] --model GGUF --port P ...

llama-cpp-python builds llama.cpp with -march=native, so on a CPU that advertises AMX it
uses AMX tiles, which fault on VMs that advertise AMX without enabling its state (see
servers.start_llama_server). llama.cpp's server has --no-repack for that; llama-cpp-python
does not expose the same switch (`use_extra_bufts` in llama_model_params), so this shim
sets it in the default model parameters before the server builds its model.
"""
from __future__ import annotations

import sys


def _disable_extra_bufts() -> None:
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params_without_extra_bufts():
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = params_without_extra_bufts


def main() -> None:
    args = sys.argv[1:]
    if "--no-extra-bufts" in args:
        args.remove("--no-extra-bufts")
        _disable_extra_bufts()
    from llama_cpp.server.__main__ import main as server_main

    sys.argv = ["llama_cpp.server", *args]
    server_main()


if __name__ == "__main__":
    main()
