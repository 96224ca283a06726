"""textmill/scale's parts that need no Ray cluster: the routing key, the prefix table, the
merged scrape, the flags, and the example Serve configs in deploy/ (loaded and built as
Ray's own `serve deploy` would)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from textmill.cli import build_parser, scale_config_from_args
from textmill.config import ScaleConfig
from textmill.scale.calls import ROUTING_CHARS, routing_text
from textmill.scale.metrics_merge import merge_scrapes
from textmill.scale.routing import PrefixTable, chunk_hashes, rank

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


# ------------------------------------------------------------------ the routing key
def _key(body) -> str:
    return routing_text("POST", "/v1/completions", json.dumps(body).encode())


def test_routing_key_is_the_start_of_the_first_prompt():
    assert _key({"prompt": "Once upon a time"}) == "Once upon a time"
    assert _key({"prompt": ["first", "second"]}) == "first"
    assert _key({"prompt": [1, 2, 3]}) == "1 2 3"
    assert _key({"prompt": [[7, 8], [9]]}) == "7 8"
    assert len(_key({"prompt": "x" * (ROUTING_CHARS * 2)})) == ROUTING_CHARS


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/v1/models", b""), ("POST", "/v1/completions", b"{not json"), ("POST", "/v1/completions", b"[1]"),
    ("POST", "/v1/completions", b'{"prompt": 5}'), ("POST", "/tokenize", b'{"prompt": "hi"}'),
])
def test_no_routing_key_where_there_is_no_prompt(method, path, body):
    assert routing_text(method, path, body) == ""


# ------------------------------------------------------------------ the prefix table
def test_chunk_hashes_chain_over_full_chunks():
    a = chunk_hashes("a" * 64 + "b" * 64 + "c" * 10, 64)
    b = chunk_hashes("a" * 64 + "b" * 64 + "d" * 70, 64)
    c = chunk_hashes("z" * 64 + "b" * 64, 64)
    assert len(a) == 2 and len(b) == 3 and a == b[:2]
    assert c[1] != a[1]  # the same chunk after a different prefix is another block


def test_longest_match_picks_the_replica_holding_the_longest_prefix():
    table = PrefixTable(max_entries=100)
    shared, other = chunk_hashes("s" * 64 * 3, 64), chunk_hashes("s" * 64 + "t" * 64, 64)
    table.record(other, "r2")
    table.record(shared, "r1")  # r1 now holds the first chunk too (it was sent it last)
    assert table.longest_match(shared, {"r1", "r2"}) == "r1"
    table.record(other, "r2")
    assert table.longest_match(shared, {"r1", "r2"}) == "r1"  # chunks 2-3 are only r1's
    assert table.longest_match(other, {"r1", "r2"}) == "r2"
    assert table.longest_match(shared, {"r2"}) == "r2"  # r1 gone: the shorter prefix's holder
    assert table.longest_match(chunk_hashes("u" * 64, 64), {"r1", "r2"}) is None


def test_the_table_forgets_the_least_recently_used():
    table = PrefixTable(max_entries=2)
    table.record(chunk_hashes("a" * 64, 64), "r1")
    table.record(chunk_hashes("b" * 128, 64), "r2")
    assert table.longest_match(chunk_hashes("a" * 64, 64), {"r1", "r2"}) is None
    assert table.longest_match(chunk_hashes("b" * 128, 64), {"r1", "r2"}) == "r2"


def test_the_holder_goes_first_unless_it_is_far_busier():
    lens = {"a": 5, "b": 1, "c": 3}
    assert rank("a", ["b", "a", "c"], lens.get, imbalanced_threshold=4) == [["a"], ["b", "c"]]
    assert rank("a", ["b", "a", "c"], lens.get, imbalanced_threshold=3) == [["b", "a", "c"]]  # 5 - 1 > 3
    assert rank(None, ["b", "a", "c"], lens.get, imbalanced_threshold=4) == [["b", "a", "c"]]


# ------------------------------------------------------------------ one scrape for all
def _exposition(waiting: float, served: float) -> str:
    registry = CollectorRegistry()
    Gauge("vllm:num_requests_waiting", "Requests waiting.", ["model_name"], registry=registry).labels("m").set(waiting)
    Counter("textmill:http_requests", "HTTP requests.", ["endpoint"], registry=registry).labels("/x").inc(served)
    return generate_latest(registry).decode()


def test_merged_scrape_labels_every_sample_with_its_replica():
    text = merge_scrapes([("r2", _exposition(3, 5)), ("r1", _exposition(1, 2))]).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    waiting = {s.labels["replica"]: s.value for s in families["vllm:num_requests_waiting"].samples}
    assert waiting == {"r1": 1.0, "r2": 3.0}
    served = {s.labels["replica"]: s.value for s in families["textmill:http_requests"].samples
              if s.name.endswith("_total")}
    assert served == {"r1": 2.0, "r2": 5.0}
    assert text.count("# TYPE vllm:num_requests_waiting gauge") == 1


# ------------------------------------------------------------------ flags
def _scale(*flags: str) -> ScaleConfig:
    return scale_config_from_args(build_parser().parse_args(["serve", *flags]))


def test_one_replica_without_an_address_is_the_single_server():
    assert not _scale().on_ray
    assert _scale("--replicas", "2").on_ray and _scale("--ray-address", "auto").on_ray
    assert _scale("--min-replicas", "1", "--max-replicas", "3").autoscaling


@pytest.mark.parametrize("flags", [("--replicas", "0"), ("--min-replicas", "3", "--max-replicas", "2")])
def test_contradicting_replica_bounds_are_refused(flags):
    with pytest.raises(ValueError):
        _scale(*flags)


def test_contradicting_bounds_end_the_cli_with_one_line(capsys):
    import logging

    from textmill.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # main() points the root logger at capsys's stderr
    try:
        assert main(["serve", "--min-replicas", "3", "--max-replicas", "2"]) == 1
    finally:
        root.handlers[:], root.level = handlers, level
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("textmill: ") and "--max-replicas" in err[0]


# ------------------------------------------------------------------ deploy/
def _built(app_config: dict):
    """The application as `serve deploy` builds it from a config file."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    return call_user_app_builder_with_args_if_necessary(import_attr(app_config.import_path), app_config.args)


def _deployments(app) -> dict:
    ingress = app._bound_deployment
    engine = ingress.init_args[0]._bound_deployment
    return {"ingress": ingress, "engine": engine}


@pytest.mark.parametrize("name", ["serve-config.yaml", "kuberay-rayservice.yaml"])
def test_deploy_examples_load_and_build(name):
    from ray.serve.schema import ServeDeploySchema

    document = yaml.safe_load((DEPLOY / name).read_text())
    if document.get("kind") == "RayService":
        document = yaml.safe_load(document["spec"]["serveConfigV2"])
    config = ServeDeploySchema.model_validate(document)
    [app_config] = config.applications
    assert app_config.route_prefix == "/"
    parts = _deployments(_built(app_config))
    engine = parts["engine"]
    assert engine.name == "TextmillEngine" and parts["ingress"].name == "TextmillIngress"
    assert engine._deployment_config.request_router_config.request_router_class == \
        "textmill.scale.routing:PrefixAffinityRouter"
    assert engine.ray_actor_options["num_cpus"] == app_config.args["cpus_per_replica"]
    if name == "serve-config.yaml":
        assert engine.num_replicas == 2
    else:
        scaling = engine._deployment_config.autoscaling_config
        assert (scaling.min_replicas, scaling.max_replicas) == (2, 8)


# ------------------------------------------------------------------ a replica dies mid-response
def _relayed(chunks: list[bytes], last_more_body: bool = True) -> tuple[list[dict], "object"]:
    """A stream's messages through the ingress relay, then the replica failing."""
    import asyncio

    from textmill.api.errors import server_error
    from textmill.scale.ingress import _Relay

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def go() -> None:
        relay = _Relay(send)
        await relay.send({"type": "http.response.start", "status": 200,
                          "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        for chunk in chunks:
            await relay.send({"type": "http.response.body", "body": chunk, "more_body": last_more_body})
        await relay.fail(server_error())

    asyncio.run(go())
    return sent


def _events(sent: list[dict]) -> list[str]:
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    return [line[6:] for line in body.splitlines() if line.startswith("data: ")]


def test_a_stream_cut_short_ends_with_an_error_event_and_done():
    sent = _relayed([b'data: {"id":"cmpl-1","choices":[]}\n\n'])
    events = _events(sent)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
    assert sent[-1] == {"type": "http.response.body", "body": sent[-1]["body"], "more_body": False}


def test_a_stream_that_sent_done_before_the_replica_died_is_only_closed():
    """The replica's [DONE] went out, its closing (empty) message did not: the client has the
    whole stream, and gets no error event after [DONE] and no second [DONE]."""
    sent = _relayed([b'data: {"id":"cmpl-1","choices":[]}\n\n', b"data: [DONE]\n\n"])
    events = _events(sent)
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    assert not any("error" in e for e in events[:-1])
    assert sent[-1]["more_body"] is False


def test_a_finished_response_gets_nothing_more():
    sent = _relayed([b"data: [DONE]\n\n"], last_more_body=False)
    assert _events(sent) == ["[DONE]"] and len(sent) == 2
