"""`textmill serve` and `textmill generate`: the one place that builds configs and wires parts."""
from __future__ import annotations

import argparse
import logging
import sys

from textmill.config import ServerConfig

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
    # 256: on 2 CPU cores a 256-token chunk takes ~0.2 s, so arriving prompts get their first
    # token sooner (16 streams: TTFT p50 0.57 s at 512, 0.40 at 256, same tok/s) and running
    # streams stall for less; docs/performance.md.
    p.add_argument("--max-num-batched-tokens", type=int, default=256,
                   help="token budget of one step; longer prompts are prefilled in chunks (default 256)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quantization", choices=("auto", "none", "int8", "int4"), default="auto",
                   help="weight-only int8/int4 linear layers (int4 keeps the LM head int8); auto = the "
                        "GGUF file's own width on the float32 CPU kernels, none elsewhere; none = float weights")
    p.add_argument("--kv-cache-dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="the KV cache's element type; auto = float16 on the CPU kernels (half the memory "
                        "of float32), the activation dtype elsewhere")
    p.add_argument("--no-kernels", action="store_true",
                   help="run float32 on eager torch ops instead of textmill's C++ kernels (the reference path)")


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help=f"larger request bodies get a 400 (default {d.max_request_bytes})")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help="longest prompt, in tokens (default: the context window)")
    p.add_argument("--max-prompts-per-request", type=int, default=d.max_prompts_per_request)
    p.add_argument("--max-n", type=int, default=d.max_n, help=f"cap on n (default {d.max_n})")
    p.add_argument("--max-best-of", type=int, default=d.max_best_of, help=f"cap on best_of (default {d.max_best_of})")
    p.add_argument("--max-logit-bias-entries", type=int, default=d.max_logit_bias_entries)
    p.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="sequences that may wait for the engine; past it a 429 with Retry-After")
    p.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout, metavar="SECONDS",
                   help="on SIGTERM, time in-flight requests get to finish (default 30)")
    p.add_argument("--request-timeout", type=_positive_seconds, default=d.request_timeout, metavar="SECONDS",
                   help="longest time one completion may take, from its arrival (queueing included) to "
                        "its last token; past it the request is stopped, its KV cache freed, and the client "
                        "gets a 504 timeout_error (a stream: an error event before [DONE]) "
                        "(default: no limit)")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textmill", description="OpenAI Completions API server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over HTTP")
    serve.add_argument("model", nargs="?", default=None, help="a .gguf file (default: bundled SmolLM2-135M)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", action="append", default=None,
                       help="required bearer key (repeatable; else TEXTMILL_API_KEY, comma-separated)")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="json: one JSON object per log line (access lines carry their fields)")
    _add_limit_args(serve)
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
    from textmill.api.access_log import configure_logging

    configure_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
    from textmill import wiring  # heavy imports (torch) only once the arguments are valid

    try:
        if args.command == "generate":
            return wiring.run_generate(args)
        return wiring.run_serve(args)
    except wiring.StartupError as exc:
        print(f"textmill: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.command != "generate":
            raise
        # A failed generation is the command's answer, not a crash: one line and a non-zero
        # status for the shell; the traceback only at debug level.
        log.debug("generate failed", exc_info=True)
        print(f"textmill: generate failed: {_one_line(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
