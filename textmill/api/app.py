"""The FastAPI application factory.

The model is loaded in the lifespan (in a worker thread, so /health can answer 503 while
it loads) by a `load` callable that cli.py builds; the app never decides what to load.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from textmill.api.auth import install_auth
from textmill.api.errors import install_error_handlers
from textmill.api.routes import router
from textmill.api.serving import ServingContext
from textmill.config import ServerConfig

log = logging.getLogger("textmill.api")


def create_app(server_config: ServerConfig, load: Callable[[], ServingContext]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        serving = await asyncio.to_thread(load)
        await serving.engine.start()
        app.state.serving = serving
        log.info("serving %s (context %d tokens)", serving.model_name, serving.max_model_len)
        try:
            yield
        finally:
            app.state.serving = None
            await serving.engine.shutdown()

    app = FastAPI(title="textmill", version="0.1.0", lifespan=lifespan,
                  summary="OpenAI Completions API on textmill's own engine")
    app.state.server_config = server_config
    app.state.serving = None
    app.state.draining = False
    install_error_handlers(app)
    install_auth(app, server_config.api_keys)
    app.include_router(router)
    return app
