"""What a Ray Serve application of textmill is built from: frozen, picklable, sent to actors."""
from __future__ import annotations

from dataclasses import dataclass

from textmill.config import EngineConfig, ScaleConfig, ServerConfig

ROUTERS = ("prefix", "pow2")


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything one engine replica needs to build the single server's app."""

    engine: EngineConfig
    server: ServerConfig
    hang_timeout: float = 60.0  # seconds without a finished step while requests wait


@dataclass(frozen=True)
class AppSpec:
    replica: ReplicaSpec
    scale: ScaleConfig
    router: str = "prefix"  # "prefix": routing.PrefixAffinityRouter; "pow2": Ray's default
    cpus_per_replica: float = 1.0  # Ray CPUs of one engine replica; its torch threads unless --threads
    ingress_replicas: int = 1
    # The prefix router sends a request away from the replica holding its prefix when that
    # replica has this many more requests than the least loaded one.
    imbalanced_threshold: int = 4
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
