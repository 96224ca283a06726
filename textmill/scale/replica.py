"""One engine replica: a whole textmill server (engine, FastAPI app, middlewares) in one Ray
actor, without a socket of its own. The ingress hands it HttpCalls; textmill's own app
answers them, so routes, errors, auth, streaming and /metrics are the single server's.

Ray calls `check_health` every few seconds and replaces a replica that fails it (dead or
hung engine: health.py); `drain` is the SIGTERM path of the single server (Lifecycle);
`__del__` stops the engine when Ray retires the replica.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
from collections.abc import AsyncIterator

from ray import serve

from textmill.scale.asgi_call import run_call
from textmill.scale.calls import HttpCall
from textmill.scale.health import EngineWatch
from textmill.scale.settings import ReplicaSpec

log = logging.getLogger("textmill.scale")


class EngineReplica:
    async def __init__(self, spec: ReplicaSpec):
        from textmill.api.app import create_app
        from textmill.wiring import build_serving

        engine = spec.engine
        if engine.device.threads is None:  # the CPUs Ray gave this actor, not the machine's
            engine = engine.updated(threads=_assigned_cpus())
        # The replica is ready when Ray sees __init__ return: load the model first.
        server = dataclasses.replace(spec.server, load_in_background=False)
        self._app = create_app(server, lambda: build_serving(engine, server.served_model_name))
        self._lifespan = None
        lifespan = self._app.router.lifespan_context(self._app)
        await lifespan.__aenter__()
        self._lifespan = lifespan  # entered: __del__ exits it (Ray may call __del__ mid-load)
        gc.freeze()  # as the single server does once loaded (commands.py)
        self._watch = EngineWatch(spec.hang_timeout)
        self.replica_label = _replica_label()
        log.info("replica %s ready (%s threads)", self.replica_label, engine.device.threads)

    async def handle(self, call: HttpCall) -> AsyncIterator[dict]:
        """The app's ASGI messages for one request, streamed as they are sent."""
        async for message in run_call(self._app, call):
            yield message

    async def scrape(self, headers: tuple[tuple[bytes, bytes], ...]) -> tuple[str, int, list, bytes]:
        """GET /metrics through the app (auth included): (replica label, status, headers, body)."""
        call = HttpCall("GET", "/metrics", b"/metrics", b"", headers, b"", None)
        status, response_headers, body = 500, [], b""
        async for message in run_call(self._app, call):
            if message["type"] == "http.response.start":
                status, response_headers = message["status"], message.get("headers", [])
            elif message["type"] == "http.response.body":
                body += message.get("body", b"")
        return self.replica_label, status, response_headers, body

    def check_health(self) -> None:
        serving = self._app.state.serving
        problem = self._watch.problem(self._app.state.lifecycle, serving.engine if serving else None)
        if problem is not None:
            log.error("replica %s unhealthy: %s", self.replica_label, problem)
            raise RuntimeError(problem)

    def identity(self) -> tuple[str, int]:
        """(replica label, process id): what an operator needs to find this replica."""
        return self.replica_label, os.getpid()

    async def drain(self) -> int:
        """The single server's SIGTERM: new requests get a 503, those in flight finish (or
        end with an error at --shutdown-timeout). Returns when nothing is left in flight."""
        lifecycle = self._app.state.lifecycle
        lifecycle.begin_drain()
        while not await lifecycle.exit_due():
            await asyncio.sleep(0.1)
        return lifecycle.in_flight

    async def __del__(self):
        lifespan, self._lifespan = getattr(self, "_lifespan", None), None
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)


def _assigned_cpus() -> int:
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    return max(1, int(cpus)) if cpus else (os.cpu_count() or 1)


def _replica_label() -> str:
    """The replica's id as Ray's own logs and dashboards show it."""
    return serve.get_replica_context().replica_id.unique_id
