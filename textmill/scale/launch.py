"""`textmill serve --replicas N` (or --ray-address): the application on Ray Serve.

Starts a local Ray head when no address is given (so it runs on a laptop) or joins the
named cluster, deploys the application (app.py) with its HTTP proxy on --host/--port,
and then waits for SIGTERM/Ctrl-C. The first signal drains as the single server does:
every replica answers new requests with a 503 and lets those in flight finish (up to
--shutdown-timeout), then the application is deleted and the process exits 0. A second
signal skips the wait.
"""
from __future__ import annotations

import logging
import signal
import threading

import ray
from ray import serve

from textmill.config import EngineConfig, ScaleConfig, ServerConfig
from textmill.scale.app import APP_NAME, ENGINE_DEPLOYMENT, application, default_cpus
from textmill.scale.settings import AppSpec, ReplicaSpec

log = logging.getLogger("textmill.scale")

# Past --shutdown-timeout, replicas get this long to send the errors that end what is left.
_DRAIN_SLACK_S = 10.0


def start_ray(scale: ScaleConfig, num_cpus: int | None = None, object_store_bytes: int | None = None) -> None:
    """Join `scale.ray_address`, or start a local head (with `num_cpus`; None: the machine's)."""
    if scale.ray_address is not None:
        ray.init(address=scale.ray_address, log_to_driver=True)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_bytes,
             log_to_driver=True)


def deploy(spec: AppSpec, host: str, port: int) -> None:
    """Deploy on the connected Ray cluster and return once every replica is ready."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(spec), name=APP_NAME, route_prefix="/")


def drain(timeout_s: float) -> None:
    """Every engine replica drains (replica.drain); returns when they are done, or at
    `timeout_s` plus a little for the errors that end what was left."""
    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=APP_NAME)
    results = handle.broadcast("drain").results(timeout_s=timeout_s + _DRAIN_SLACK_S, return_exceptions=True)
    for failed in (r for r in results if isinstance(r, BaseException)):  # e.g. a replica that died meanwhile
        log.warning("a replica did not drain: %s", failed)
    log.info("drained: %d requests were still in flight at the end",
             sum(r for r in results if isinstance(r, int)))


def serve_on_ray(engine: EngineConfig, server: ServerConfig, scale: ScaleConfig) -> int:
    from textmill.wiring import model_path

    if engine.model is not None:
        model_path(engine.model)  # fail fast on a missing file, before Ray starts (each node loads its own)
    spec = AppSpec(ReplicaSpec(engine, server), scale, cpus_per_replica=default_cpus(engine, scale))
    stop = threading.Event()
    signals = 0

    def on_signal(signum, frame) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            raise KeyboardInterrupt  # a second signal: leave at once
        stop.set()

    start_ray(scale)
    # After ray.init: Ray's core worker installs a handler that aborts the driver on SIGTERM.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        deploy(spec, server.host, server.port)
        log.info("serving on http://%s:%d with %s engine replicas on Ray Serve", server.host, server.port,
                 f"{scale.min_replicas}-{scale.max_replicas}" if scale.autoscaling else scale.replicas)
        while not stop.wait(1.0):
            pass
        log.info("draining: up to %.0fs for requests in flight", server.shutdown_timeout)
        drain(server.shutdown_timeout)
    except KeyboardInterrupt:
        log.warning("second signal: stopping without waiting")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if ray.is_initialized():
            serve.delete(APP_NAME) if scale.ray_address is not None else serve.shutdown()
            ray.shutdown()
    return 0
