"""The operations pieces of api/ without a model: keys, admission, lifecycle, request ids,
logs, metrics, and the middlewares on a small Starlette app."""
from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from textmill.api.access_log import JsonFormatter, RequestTrace, log_access, request_id_from
from textmill.api.admission import Admission
from textmill.api.auth import AuthMiddleware, key_matches
from textmill.api.errors import APIError
from textmill.api.lifecycle import Lifecycle, Phase
from textmill.api.metrics import Metrics, TokenTimer
from textmill.api.middleware import BodyLimitMiddleware, OpsMiddleware
from textmill.api.prepare import Limits, prepare
from textmill.api.protocol import CompletionRequest
from textmill.engine.engine import EngineStats


# ---------------------------------------------------------------- keys
@pytest.mark.parametrize("header,ok", [
    ("Bearer k1", True), ("Bearer k2", True), ("bearer k2", True), ("Bearer  k1 ", True),
    ("Bearer k3", False), ("Bearer k", False), ("Bearer k1k", False), ("k1", False), ("Basic k1", False),
    ("Bearer", False), ("", False), (None, False), ("Bearer \u00e9", False),
])
def test_key_matches(header, ok):
    assert key_matches(header, (b"k1", b"k2")) is ok


# ---------------------------------------------------------------- admission
def test_admission_bounds_waiting_sequences():
    adm = Admission(max_queued=3)
    assert adm.admit(2, num_running=0, param="n") == 2
    assert adm.admit(1, num_running=0, param="n") == 1
    with pytest.raises(APIError) as exc:
        adm.admit(1, num_running=0, param="n")
    assert exc.value.status == 429 and exc.value.headers == {"Retry-After": "1"}
    assert exc.value.body()["error"]["code"] == "rate_limit_exceeded"
    # Once two of them run, two more may wait.
    assert adm.admit(2, num_running=2, param="n") == 2
    adm.release(5)
    assert adm.admitted == 0


def test_admission_refuses_what_can_never_fit_with_a_400():
    with pytest.raises(APIError) as exc:
        Admission(max_queued=3).admit(4, num_running=0, param="prompt")
    assert exc.value.status == 400 and exc.value.param == "prompt"


# ---------------------------------------------------------------- lifecycle
class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Engine:
    def __init__(self):
        self.shutdowns = []

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        self.shutdowns.append(drain_timeout)


def test_lifecycle_drains_until_idle_or_deadline():
    clock, engine = _Clock(), _Engine()
    life = Lifecycle(shutdown_timeout=10, clock=clock)
    assert life.phase is Phase.LOADING and not asyncio.run(life.exit_due())
    life.ready(engine)
    assert life.accepting
    life.in_flight = 2
    assert life.begin_drain() and not life.begin_drain()
    assert not life.accepting and not asyncio.run(life.exit_due())
    clock.now += 9.9
    assert not asyncio.run(life.exit_due()) and engine.shutdowns == []
    clock.now += 0.2  # past the deadline: the engine ends what is left, handlers get a grace
    assert not asyncio.run(life.exit_due()) and engine.shutdowns == [0.0]
    clock.now += 5
    assert asyncio.run(life.exit_due()) and engine.shutdowns == [0.0]


def test_lifecycle_exits_at_once_when_nothing_is_in_flight_or_load_failed():
    life = Lifecycle(shutdown_timeout=10, clock=_Clock())
    life.ready(_Engine())
    life.begin_drain()
    assert asyncio.run(life.exit_due())
    failed = Lifecycle(shutdown_timeout=10)
    failed.fail("cannot load model x: bad magic")
    assert asyncio.run(failed.exit_due()) and failed.load_error == "cannot load model x: bad magic"
    assert not failed.begin_drain()


# ---------------------------------------------------------------- ids and logs
def test_request_id_from_header():
    assert request_id_from("abc-1.2:3_x") == "abc-1.2:3_x"
    for bad in (None, "", "has space", "x" * 129, "semi;colon", "new\nline"):
        fresh = request_id_from(bad)
        assert fresh != bad and len(fresh) == 32


def test_access_line_and_json_format(caplog):
    trace = RequestTrace("rid-1", "POST", "/v1/completions", started=0.0, status=200, prompt_tokens=5,
                         completion_tokens=7, ttft_s=0.0123, duration_s=0.5, user="u\"1")
    with caplog.at_level(logging.INFO, logger="textmill.access"):
        log_access(trace)
        log_access(RequestTrace("rid-2", "GET", "/health", status=200))  # probes only at debug
    (record,) = caplog.records
    assert record.getMessage() == ("rid-1 POST /v1/completions 200 prompt_tokens=5 completion_tokens=7 "
                                   "ttft_ms=12.3 total_ms=500.0")
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "rid-1" and line["status"] == 200 and line["ttft_s"] == 0.0123
    assert line["user"] == 'u"1' and line["level"] == "INFO" and "\n" not in JsonFormatter().format(record)


# ---------------------------------------------------------------- metrics
def _stats(**kw) -> EngineStats:
    base = dict(num_waiting=3, num_running=2, kv_cache_usage=0.25, prefix_cache_queries=100, prefix_cache_hits=40,
                prompt_tokens_total=500, generation_tokens_total=70, num_preemptions_total=1,
                num_requests_finished=9, num_step_failures=0)
    return EngineStats(**{**base, **kw})


def _ctx(stats: EngineStats):
    return SimpleNamespace(engine=SimpleNamespace(stats=lambda: stats), model_name="m", kv_cache_blocks=64)


def test_metrics_expose_vllm_names_from_engine_stats():
    metrics = Metrics(lambda: _ctx(_stats()), lambda: 4, lambda: 5)
    text = metrics.render()[0].decode()
    for line in ('vllm:num_requests_waiting{model_name="m"} 3.0', 'vllm:num_requests_running{model_name="m"} 2.0',
                 'vllm:kv_cache_usage_perc{model_name="m"} 0.25', 'vllm:prefix_cache_queries_total{model_name="m"} 100.0',
                 'vllm:prefix_cache_hits_total{model_name="m"} 40.0', 'textmill:prefix_cache_hit_rate{model_name="m"} 0.4',
                 'textmill:kv_cache_blocks_in_use{model_name="m"} 16.0', "textmill:http_requests_in_flight 4.0",
                 "textmill:admitted_sequences 5.0", 'textmill:generation_tokens_total{model_name="m"} 70.0'):
        assert line in text, line
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in text


def test_metrics_registries_are_per_app_and_survive_loading():
    loading = Metrics(lambda: None, lambda: 0, lambda: 0)
    other = Metrics(lambda: _ctx(_stats()), lambda: 0, lambda: 0)  # a second app: no duplicate-name error
    assert "vllm:num_requests_running" not in loading.render()[0].decode()
    assert "vllm:num_requests_running" in other.render()[0].decode()


def test_token_timer_observes_ttft_once_and_gaps_per_token():
    metrics = Metrics(lambda: None, lambda: 0, lambda: 0)
    trace = RequestTrace("r", "POST", "/v1/completions")
    timer = TokenTimer(metrics, trace, "m")
    for key, total in (((0, 0), 0), ((0, 0), 1), ((0, 1), 1), ((0, 0), 3), ((0, 0), 3), ((0, 1), 2)):
        timer.observe(key, total)
    reg = metrics.registry
    assert reg.get_sample_value("vllm:time_to_first_token_seconds_count", {"model_name": "m"}) == 1
    # (0,0): 1 -> 3 is two tokens; (0,1): 1 -> 2 is one.
    assert reg.get_sample_value("textmill:inter_token_latency_seconds_count", {"model_name": "m"}) == 3
    assert trace.ttft_s is not None and trace.ttft_s >= 0


# ---------------------------------------------------------------- prepare
def test_lone_surrogates_and_caps_are_400s():
    limits = Limits(max_model_len=100, vocab_size=50, max_n=2, max_best_of=3)
    cases = [({"prompt": "\ud800"}, "prompt"), ({"prompt": ["ok", "x\udfff"]}, "prompt"),
             ({"prompt": "ok", "stop": ["\udc00"]}, "stop"), ({"prompt": "ok", "suffix": "\ud83d"}, "suffix"),
             ({"prompt": "ok", "n": 3}, "n"), ({"prompt": "ok", "best_of": 4}, "best_of")]
    for fields, param in cases:
        with pytest.raises(APIError) as exc:
            prepare(CompletionRequest(model="m", **fields), None, limits)  # refused before tokenizing
        assert exc.value.status == 400 and exc.value.param == param
        exc.value.response()  # the message renders as UTF-8 even when it quotes the input


# ---------------------------------------------------------------- middlewares
def _app(life: Lifecycle, adm: Admission, metrics: Metrics) -> Starlette:
    async def echo(request: Request):
        body = await request.body()
        return JSONResponse({"bytes": len(body), "id": request.state.trace.request_id,
                             "in_flight": life.in_flight})

    async def health(request: Request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/v1/echo", echo, methods=["POST"]), Route("/health", health)])
    app.add_middleware(BodyLimitMiddleware, max_bytes=100)
    app.add_middleware(AuthMiddleware, api_keys=("key",))
    app.add_middleware(OpsMiddleware, lifecycle=life, admission=adm, metrics=metrics)
    return app


def test_middlewares_in_order():
    life, adm = Lifecycle(30), Admission(10)
    metrics = Metrics(lambda: None, lambda: life.in_flight, lambda: adm.admitted)
    life.ready(_Engine())
    client = TestClient(_app(life, adm, metrics))
    auth = {"Authorization": "Bearer key"}
    r = client.post("/v1/echo", content=b"x" * 100, headers={**auth, "X-Request-Id": "mine"})
    assert r.json() == {"bytes": 100, "id": "mine", "in_flight": 1} and r.headers["x-request-id"] == "mine"
    assert life.in_flight == 0
    r = client.post("/v1/echo", content=b"x" * 101, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"
    chunked = client.post("/v1/echo", content=iter([b"x" * 60, b"x" * 60]), headers=auth)
    assert chunked.status_code == 400 and chunked.json()["error"]["param"] is None
    r = client.post("/v1/echo", content=b"x" * 1000)
    assert r.status_code == 401 and r.headers["x-request-id"]  # auth before the body is read
    assert client.get("/health").text == "ok"
    life.begin_drain()
    r = client.post("/v1/echo", content=b"{}", headers=auth)
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
    assert client.get("/health").status_code == 200  # the route itself answers probes
    counts = {(s.labels["endpoint"], s.labels["status"]): s.value for s in metrics.requests.collect()[0].samples
              if s.name.endswith("_total")}
    assert counts == {("other", "200"): 1, ("other", "400"): 2, ("other", "401"): 1, ("other", "503"): 1,
                      ("/health", "200"): 2}
