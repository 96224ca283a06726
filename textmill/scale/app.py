"""The Ray Serve application: an ingress deployment in front of N engine replicas.

`build_app` is the application builder Ray's own tooling calls: a Serve config file's
`import_path: textmill.scale.app:build_app`, `serve run textmill.scale.app:build_app`, a
KubeRay RayService. Its `args` are textmill serve's own flags (deploy/serve-config.yaml):

    args:
      serve_args: ["--kv-cache-memory", "0.5", "--min-replicas", "1", "--max-replicas", "4"]
      router: prefix        # or pow2 (Ray's default power-of-two router)
      cpus_per_replica: 2   # the Ray CPUs (and torch threads) of one engine replica

`application(spec)` is the same from frozen configs (the CLI, tests).
"""
from __future__ import annotations

import os
import shlex
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from textmill.scale.ingress import IngressDeployment
from textmill.scale.replica import EngineReplica
from textmill.scale.settings import AppSpec, ReplicaSpec

APP_NAME = "textmill"
ENGINE_DEPLOYMENT = "TextmillEngine"
INGRESS_DEPLOYMENT = "TextmillIngress"
# Seconds past --shutdown-timeout that Ray waits for a retiring replica before killing it.
_SHUTDOWN_SLACK_S = 5.0


def build_app(args: dict[str, Any]) -> Application:
    return application(spec_from_args(args))


def spec_from_args(args: dict[str, Any]) -> AppSpec:
    from textmill.cli import build_parser, engine_config_from_args, scale_config_from_args, server_config_from_args

    flags = args.get("serve_args") or []
    if isinstance(flags, str):
        flags = shlex.split(flags)
    parsed = build_parser().parse_args(["serve", *map(str, flags)])
    engine, server, scale = (engine_config_from_args(parsed), server_config_from_args(parsed),
                             scale_config_from_args(parsed))
    cpus = args.get("cpus_per_replica")
    return AppSpec(ReplicaSpec(engine, server), scale, router=str(args.get("router", "prefix")),
                   cpus_per_replica=float(cpus) if cpus is not None else default_cpus(engine, scale))


def default_cpus(engine, scale) -> float:
    """--threads when given; else this machine's cores shared by the replicas it will hold
    (on a cluster, set cpus_per_replica to what one replica should have)."""
    if engine.device.threads is not None:
        return float(engine.device.threads)
    return float(max(1, (os.cpu_count() or 1) // max(1, scale.replicas)))


def application(spec: AppSpec) -> Application:
    server = spec.replica.server
    engine = serve.deployment(
        EngineReplica, name=ENGINE_DEPLOYMENT,
        ray_actor_options={"num_cpus": spec.cpus_per_replica},
        # The replica's own admission answers 429 past --max-queued-requests; Ray's limit
        # only has to let that many through.
        max_ongoing_requests=server.max_queued_requests,
        health_check_period_s=spec.health_check_period_s, health_check_timeout_s=spec.health_check_timeout_s,
        graceful_shutdown_timeout_s=server.shutdown_timeout + _SHUTDOWN_SLACK_S,
        **_router_config(spec), **_replica_count(spec),
    )
    ingress = serve.deployment(
        IngressDeployment, name=INGRESS_DEPLOYMENT, num_replicas=spec.ingress_replicas,
        ray_actor_options={"num_cpus": 0},  # it only relays bytes; the CPUs are the engines'
        max_ongoing_requests=100_000,  # back-pressure is the engine replicas' (429s)
        graceful_shutdown_timeout_s=server.shutdown_timeout + _SHUTDOWN_SLACK_S,
    )
    return ingress.bind(engine.bind(spec.replica), server.max_request_bytes)


def _replica_count(spec: AppSpec) -> dict[str, Any]:
    scale = spec.scale
    if not scale.autoscaling:
        return {"num_replicas": scale.replicas}
    low = scale.min_replicas if scale.min_replicas is not None else min(scale.replicas, scale.max_replicas or 1)
    high = scale.max_replicas if scale.max_replicas is not None else max(scale.replicas, low)
    return {"autoscaling_config": AutoscalingConfig(
        min_replicas=low, max_replicas=high, initial_replicas=min(max(scale.replicas, low), high),
        # Ray's request-based policy: requests queued at the handles plus those running on a
        # replica, per replica, against this target.
        target_ongoing_requests=scale.target_queued_requests, upscale_delay_s=10.0, downscale_delay_s=60.0)}


def _router_config(spec: AppSpec) -> dict[str, Any]:
    if spec.router == "pow2":
        return {}  # Ray's default: PowerOfTwoChoicesRequestRouter
    return {"request_router_config": RequestRouterConfig(
        request_router_class="textmill.scale.routing:PrefixAffinityRouter",
        request_router_kwargs={"imbalanced_threshold": spec.imbalanced_threshold})}
