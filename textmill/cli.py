"""`textmill serve` and `textmill generate`: arguments in, configs out.

Every flag is a field of a config.py dataclass (its `option()` metadata): the parser is
built from those fields, and a parsed namespace is turned back into the same dataclasses,
so a default and its help text live in config.py alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from collections.abc import Mapping
from typing import Any

from textmill import collector
from textmill.config import (CacheConfig, DeviceConfig, EngineConfig, GenerateConfig, Option, ScaleConfig,
                             SchedulerConfig, ServerConfig)

log = logging.getLogger("textmill")

ENGINE_GROUPS = (DeviceConfig, CacheConfig, SchedulerConfig)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field of `cls` that has an option(); dest is the field's name."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        opt: Option | None = f.metadata.get("option")
        if opt is None:
            continue
        flag = opt.flag or "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "help": _help(opt, f.default)}
        if isinstance(f.default, bool):
            kw["action"] = "store_false" if f.default else "store_true"
        elif opt.repeatable:
            kw.update(action="append", default=None, metavar=opt.metavar)  # a tuple once parsed
        else:
            kw.update(default=f.default, type=_parser(opt, hints[f.name]), choices=opt.choices,
                      metavar=opt.metavar)
        parser.add_argument(flag, **kw)


def _help(opt: Option, default: Any) -> str:
    if isinstance(default, bool) or default in (None, ()) or "default" in opt.help:
        return opt.help
    return f"{opt.help} (default {default})"


def _parser(opt: Option, hint: Any):
    if opt.parse is not None:
        def parse(text: str):
            try:
                return opt.parse(text)
            except ValueError as exc:  # argparse shows an ArgumentTypeError's own words
                raise argparse.ArgumentTypeError(str(exc)) from None
        return parse
    # `int | None` parses as int; argparse keeps the None default when the flag is absent.
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    return kinds[0]


def from_args(cls: type, args: argparse.Namespace, **extra: Any):
    """`cls` with each optioned field taken from `args` (fields without one from `extra`)."""
    values = dict(extra)
    for f in dataclasses.fields(cls):
        opt = f.metadata.get("option")
        if opt is not None and hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value or ()) if opt.repeatable else value
    return cls(**values)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, device=from_args(DeviceConfig, args), cache=from_args(CacheConfig, args),
                        scheduler=from_args(SchedulerConfig, args))


def server_config_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ServerConfig:
    """The flags' keys, else TEXTMILL_API_KEY's (comma-separated); the CLI opens the port
    before the model is loaded."""
    config = from_args(ServerConfig, args, load_in_background=True)
    if not config.api_keys:
        keys = tuple(k for k in environ.get("TEXTMILL_API_KEY", "").split(",") if k)
        config = dataclasses.replace(config, api_keys=keys)
    return config


def scale_config_from_args(args: argparse.Namespace) -> ScaleConfig:
    """Raises ValueError for bounds that contradict each other."""
    return from_args(ScaleConfig, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textmill", description="OpenAI Completions API server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over HTTP")
    model = next(f for f in dataclasses.fields(EngineConfig) if f.name == "model")
    serve.add_argument("model", nargs="?", default=model.default, help=model.metadata["option"].help)
    add_options(serve, ServerConfig)
    add_options(serve, ScaleConfig)
    gen = sub.add_parser("generate", help="complete one prompt and print it, without a server")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=model.default, help=model.metadata["option"].help)
    add_options(gen, GenerateConfig)
    for p in (serve, gen):
        for cls in ENGINE_GROUPS:
            add_options(p, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from textmill.api.access_log import configure_logging

    server = server_config_from_args(args) if args.command == "serve" else None
    configure_logging(*((server.log_level, server.log_format) if server else ("info", "text")))
    if server is None or _loads_here(args):
        _prefetch(args.model)  # the disk reads the model while torch imports
    with collector.paused():  # torch's import makes ~160k objects for good (collector.py)
        from textmill import commands, wiring  # heavy imports (torch) only once the arguments are valid

    engine = engine_config_from_args(args)
    try:
        if server is None:
            return commands.generate(engine, from_args(GenerateConfig, args, prompt=args.prompt))
        try:
            scale = scale_config_from_args(args)
        except ValueError as exc:
            raise wiring.StartupError(str(exc)) from None
        if scale.on_ray:
            return _serve_on_ray(engine, server, scale)
        return commands.serve(engine, server)
    except wiring.StartupError as exc:
        print(f"textmill: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:
        if server is not None:
            raise
        # A failed generation is the command's answer, not a crash: one line and a non-zero
        # status for the shell; the traceback only at debug level.
        log.debug("generate failed", exc_info=True)
        print(f"textmill: generate failed: {_one_line(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        return 1


def _loads_here(args: argparse.Namespace) -> bool:
    """Whether `serve` loads the model on this machine: not when its flags are wrong (it is
    about to fail) or name a Ray cluster (the replicas load there)."""
    try:
        scale = scale_config_from_args(args)
    except ValueError:
        return False
    return scale.ray_address is None


def _prefetch(model: str | None) -> None:
    """Best effort: a failure here never stops the command (the load reports a bad path)."""
    from textmill.loader.bundled import resolve_model_path
    from textmill.loader.prefetch import prefetch_in_background

    try:
        prefetch_in_background(resolve_model_path(model))
    except Exception:  # noqa: BLE001 - read-ahead is an optimization, never an error
        log.debug("read-ahead of the model file skipped", exc_info=True)


def _serve_on_ray(engine: EngineConfig, server: ServerConfig, scale: ScaleConfig) -> int:
    from textmill.wiring import StartupError

    try:
        from textmill.scale.launch import serve_on_ray
    except ImportError as exc:  # the optional extra is not installed
        raise StartupError(f"--replicas/--ray-address run on Ray Serve: pip install 'textmill[ray]' ({exc})") from None
    return serve_on_ray(engine, server, scale)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
