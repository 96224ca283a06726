"""textmill on a local Ray head, deployed in-process as `textmill serve --replicas N` deploys
it (scale/launch.py) but with a choice of router, for bench/ray_prefix.py; and the
shared-prefix workload that bench and tests/integration/test_ray_serve.py share."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from textmill.config import EngineConfig, ScaleConfig, ServerConfig
from textmill.scale.settings import AppSpec, ReplicaSpec

# Ray's object store holds nothing big here (requests and responses travel inline).
OBJECT_STORE_BYTES = 128 * 2**20


@contextlib.contextmanager
def ray_app(engine: EngineConfig, replicas: int = 2, router: str = "prefix", server: ServerConfig | None = None,
            port: int = 0, num_cpus: int = 2) -> Iterator[str]:
    """A local Ray head with `num_cpus` CPUs, the application deployed with one CPU (one torch
    thread) per replica; yields its base URL. Everything is shut down on exit."""
    import ray
    from ray import serve

    from textmill.scale.launch import deploy, start_ray

    from .server import free_port

    port = port or free_port()
    scale = ScaleConfig(replicas=replicas)
    spec = AppSpec(ReplicaSpec(engine, server or ServerConfig()), scale, router=router, cpus_per_replica=1,
                   health_check_period_s=2.0, health_check_timeout_s=20.0)
    start_ray(scale, num_cpus=num_cpus, object_store_bytes=OBJECT_STORE_BYTES)
    try:
        deploy(spec, "127.0.0.1", port)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


_WORDS = tuple("""time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work number night point home
water room mother area money story fact month book eye job word business issue side kind head house
service friend father power hour game line end member law car city community name team minute idea body
information back parent face level office door health person art war history party result change morning
reason research girl moment air teacher force education foot age policy process music market sense nation
plan college interest death experience effect class control care field development role effort rate heart
""".split())


def shared_prefixes(count: int = 4, words: int = 300, seed: int = 16) -> list[str]:
    """`count` distinct prefixes of `words` words each, the same on every run."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(count)]


def shared_prefix_requests(prefixes: list[str], per_prefix: int = 8) -> list[tuple[int, str]]:
    """(prefix index, prompt) in arrival order: the prefixes take turns, each request its
    own question after the shared text (so no two prompts are equal)."""
    return [(p, f"{prefixes[p]}\nQuestion {i}: what comes next?") for i in range(per_prefix)
            for p in range(len(prefixes))]
