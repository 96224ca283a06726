"""The FastAPI application factory.

The model is loaded by a `load` callable that cli.py builds (the app never decides what to
load), in a thread of its own that ends with the load (run_in_passing_thread). With
`load_in_background` the port opens first and /health answers 503 until the engine runs; a
load that fails then marks the Lifecycle failed, and the server exits with that one
message (api/server.py, commands.serve).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from textmill.api.admission import Admission
from textmill.api.auth import AuthMiddleware
from textmill.api.errors import install_error_handlers
from textmill.api.tokens import router as tokens_router
from textmill.api.lifecycle import Lifecycle
from textmill.api.metrics import Metrics
from textmill.api.middleware import BodyLimitMiddleware, OpsMiddleware
from textmill.api.playground import router as playground_router
from textmill.api.routes import router
from textmill.api.serving import ServingContext
from textmill.config import ServerConfig

log = logging.getLogger("textmill.api")


def create_app(server_config: ServerConfig, load: Callable[[], ServingContext]) -> FastAPI:
    lifecycle = Lifecycle(server_config.shutdown_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(_load(app, load, lifecycle, raise_errors=not server_config.load_in_background))
        if not server_config.load_in_background:
            await loading
        try:
            yield
        finally:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await loading  # a load still running in its thread cannot be cut short
            serving, app.state.serving = app.state.serving, None
            if serving is not None:
                await serving.engine.shutdown()

    app = FastAPI(title="textmill", version="0.1.0", lifespan=lifespan,
                  summary="OpenAI Completions API on textmill's own engine")
    app.state.server_config = server_config
    app.state.serving = None
    app.state.lifecycle = lifecycle
    app.state.admission = Admission(server_config.max_queued_requests)
    app.state.metrics = Metrics(lambda: app.state.serving, lambda: lifecycle.in_flight,
                                lambda: app.state.admission.admitted)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(tokens_router)
    app.include_router(playground_router)
    # Added innermost first: a request meets OpsMiddleware, then auth, then the body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=server_config.max_request_bytes)
    app.add_middleware(AuthMiddleware, api_keys=server_config.api_keys)
    app.add_middleware(OpsMiddleware, lifecycle=lifecycle, admission=app.state.admission,
                       metrics=app.state.metrics)
    return app


async def _load(app: FastAPI, load: Callable[[], ServingContext], lifecycle: Lifecycle, raise_errors: bool) -> None:
    try:
        serving = await run_in_passing_thread(load)
        await serving.engine.start()
    except Exception as exc:
        # One line for the operator (the CLI prints it); the traceback only at debug level.
        log.debug("model load failed", exc_info=True)
        lifecycle.fail(str(exc) or type(exc).__name__)
        if raise_errors:
            raise
        return
    app.state.serving = serving
    lifecycle.ready(serving.engine)
    log.info("serving %s (context %d tokens)", serving.model_name, serving.max_model_len)


async def run_in_passing_thread(fn: Callable):
    """fn() in a new thread that ends when fn returns, not in asyncio's long-lived executor.

    Why: loading runs torch's parallel loops, and OpenMP (libgomp) keeps a pool of worker
    threads for every thread that has run one, for as long as that thread lives. A pool left
    behind in an executor thread, next to the engine thread's own, makes libgomp count more
    threads than cores; it then stops spinning between parallel regions in every pool, and
    each of the engine's parallel regions in a step pays a futex sleep and wake-up
    (docs/performance.md has the measurement). A thread that exits takes its pool with it.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(setter, value) -> None:
        if not done.done():  # the awaiting task may have been cancelled meanwhile
            setter(value)

    def target() -> None:
        try:
            outcome = (done.set_result, fn())
        except BaseException as exc:  # handed to the awaiting task, which raises it
            outcome = (done.set_exception, exc)
        with contextlib.suppress(RuntimeError):  # the event loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name="textmill-load", daemon=True).start()
    return await done
