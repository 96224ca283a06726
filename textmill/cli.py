"""`textmill serve` and `textmill generate`: the one place that builds configs and wires parts."""
from __future__ import annotations

import argparse
import logging
import sys

from textmill.config import CacheConfig, DeviceConfig, SchedulerConfig, ServerConfig
from textmill.loader.bundled import BUNDLED_NAME

log = logging.getLogger("textmill")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="weights and activations; auto = bfloat16 where the CPU/GPU has native support")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--kv-cache-memory", type=float, default=1.0, metavar="GIB",
                   help="memory for the paged KV cache, in GiB (default 1)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64, help="most requests in one running batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="token budget of one step; longer prompts are prefilled in chunks")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textmill", description="OpenAI Completions API server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over HTTP")
    serve.add_argument("model", nargs="?", default=None, help="a .gguf file (default: bundled SmolLM2-135M)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", action="append", default=None,
                       help="required bearer key (repeatable; also TEXTMILL_API_KEY)")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--max-queued-requests", type=int, default=256)
    serve.add_argument("--log-level", default="info")
    _add_model_args(serve)
    gen = sub.add_parser("generate", help="complete one prompt and print it, without a server")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    _add_model_args(gen)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from textmill import wiring  # heavy imports (torch) only once the arguments are valid

    try:
        if args.command == "generate":
            return wiring.run_generate(args)
        return wiring.run_serve(args)
    except wiring.StartupError as exc:
        print(f"textmill: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
