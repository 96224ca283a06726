"""One Prometheus scrape for all replicas: each replica's /metrics text, every sample given a
`replica` label, families merged (the text format wants each family once, its samples
together), names unchanged (vllm:num_requests_waiting stays what gateways read)."""
from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

REPLICA_LABEL = "replica"


def merge_scrapes(scrapes: Iterable[tuple[str, str]]) -> bytes:
    """`scrapes`: (replica label, Prometheus text) pairs; the merged text exposition."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(scrapes):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                        family.unit)
            for s in family.samples:
                merged.add_sample(s.name, {**s.labels, REPLICA_LABEL: replica}, s.value, s.timestamp, s.exemplar)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self):
        return self._families
