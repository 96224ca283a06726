"""Property-based conformance: schemathesis drives /v1/* from the server's own /openapi.json
(the real pydantic schema of CompletionRequest) and checks that no response is a 5xx, that
every status, content type and JSON body is what the schema documents, and that data the
schema forbids is refused.

Bounded to run in CI in well under two minutes: a 48-token context and small caps keep
each generated request cheap, and the number of examples is fixed.
"""
from __future__ import annotations

import collections

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from textmill.config import ServerConfig

from .ops_server import MODEL, ops_server
from .server import TEST_OPTIONS

OPTIONS = TEST_OPTIONS.updated(max_model_len=48, memory_gib=0.05)
CONFIG = ServerConfig(max_n=2, max_best_of=2, max_prompts_per_request=2, max_logit_bias_entries=8)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def api_schema():
    with ops_server(CONFIG, OPTIONS) as running:
        yield schemathesis.openapi.from_url(f"{running.url}/openapi.json").include(path_regex="^/v1/")


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def _served_model(case):
    """Name the served model (a random name is always a 404, which test_errors covers)."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL
    return case


# schemathesis's own pytest plugin (from_fixture) does not work with pytest 9, so hypothesis
# drives each operation's strategy here, which is all that plugin does.
@pytest.mark.slow
@pytest.mark.parametrize("mode,examples", [(GenerationMode.POSITIVE, 100), (GenerationMode.NEGATIVE, 50)],
                         ids=["positive", "negative"])
def test_api_conforms_to_its_schema(api_schema, mode, examples):
    operations = _operations(api_schema)
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/models"}
    statuses: list[int] = []
    for op in operations:
        if mode is GenerationMode.NEGATIVE and op.path != "/v1/completions":
            continue  # /v1/models takes no input to get wrong

        @given(case=op.as_strategy(generation_mode=mode).map(_served_model))
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)
        def check(case):
            statuses.append(case.call_and_validate(checks=CHECKS, timeout=60).status_code)

        check()
    print(f"{mode.value}: {len(statuses)} calls, statuses {sorted(collections.Counter(statuses).items())}")
    if mode is GenerationMode.POSITIVE:
        assert statuses.count(200) >= 10, statuses  # real completions ran, not only refusals
    else:
        assert all(400 <= s < 500 for s in statuses), statuses
