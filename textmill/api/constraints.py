"""The request fields that constrain the output -> one StructuredOutput, or a 400 naming the field.

Accepted, all on POST /v1/completions:
  structured_outputs: {json | regex | choice | grammar | json_object}   vLLM (exactly one key)
  response_format: {"type": "json_object"} | {"type": "json_schema", "json_schema": {...}}
  json_schema (a schema object), grammar (GBNF text)                      llama.cpp
  guided_json, guided_regex, guided_choice, guided_grammar                vLLM's older names
At most one constraint per request. The backend's own checks (a schema it cannot read, a
regex that does not parse, a GBNF rule that is missing) come from compiling, in prepare.py.
"""
from __future__ import annotations

import json
from typing import Any

from textmill.api.errors import APIError, bad_request
from textmill.api.protocol import CompletionRequest
from textmill.structured import StructuredOutput

_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
_RESPONSE_FORMATS = ("text", "json_object", "json_schema")
ANY_JSON_OBJECT = '{"type": "object"}'


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def requested_constraint(req: CompletionRequest) -> tuple[StructuredOutput, str] | None:
    """The request's constraint and the field it came from, or None; 400 for two of them."""
    found: list[tuple[StructuredOutput, str]] = []
    if req.structured_outputs is not None:
        found += _structured_outputs(req.structured_outputs)
    if req.response_format is not None:
        found += _response_format(req.response_format)
    # The older fields one after another, in this order: the second found names the 400.
    found += _present([("json", req.json_schema, "json_schema"), ("grammar", req.grammar, "grammar"),
                       ("json", req.guided_json, "guided_json"), ("regex", req.guided_regex, "guided_regex"),
                       ("choice", req.guided_choice, "guided_choice"),
                       ("grammar", req.guided_grammar, "guided_grammar")])
    if len(found) > 1:
        names = " and ".join(param for _, param in found)
        raise bad_request(f"A request may carry one output constraint; this one has {names}.", found[1][1])
    for structured, param in found:
        try:  # JSON may escape lone surrogates ("\ud800"), which no grammar engine can take
            structured.spec.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(f"{param} is not valid Unicode text: it holds a lone surrogate.", param) from None
    return found[0] if found else None


def _structured_outputs(so) -> list[tuple[StructuredOutput, str]]:
    for key, value in (so.model_extra or {}).items():
        if value is not None and value is not False:
            raise unsupported(f"structured_outputs.{key}", f"structured_outputs.{key} is not supported by "
                              f"this server; use one of {', '.join(_STRUCTURED_KEYS)}.")
    out = _present([(kind, value, f"structured_outputs.{key}") for kind, value, key in (
        ("json", so.json_schema, "json"), ("regex", so.regex, "regex"), ("choice", so.choice, "choice"),
        ("grammar", so.grammar, "grammar"))])
    if so.json_object:
        out.append((StructuredOutput("json", ANY_JSON_OBJECT), "structured_outputs.json_object"))
    if not out:
        raise bad_request(f"structured_outputs must set one of {', '.join(_STRUCTURED_KEYS)}.", "structured_outputs")
    return out


def _response_format(rf) -> list[tuple[StructuredOutput, str]]:
    if rf.type == "text":
        return []
    if rf.type == "json_object":
        return [(StructuredOutput("json", ANY_JSON_OBJECT), "response_format")]
    if rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad_request("response_format of type json_schema needs json_schema.schema.", "response_format")
        return [(_json_spec(rf.json_schema.schema_, "response_format"), "response_format")]
    raise unsupported("response_format", f"response_format type {rf.type!r} is not supported; use one of "
                                         f"{', '.join(_RESPONSE_FORMATS)}.")


def _present(fields: list[tuple[str, Any, str]]) -> list[tuple[StructuredOutput, str]]:
    """(kind, value, param) of constraint fields -> the constraint of each one that is set."""
    make = {"json": _json_spec, "choice": _choice_spec}
    return [(make[kind](value, param) if kind in make else _text_spec(kind, value, param), param)
            for kind, value, param in fields if value is not None]


def _json_spec(schema: dict[str, Any] | str, param: str) -> StructuredOutput:
    if isinstance(schema, str):  # vLLM takes the schema as JSON text too
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise bad_request(f"{param} is not valid JSON: {exc}.", param) from None
        if not isinstance(schema, dict):
            raise bad_request(f"{param} must be a JSON schema object.", param)
    # Key order kept: a schema's properties are generated in the order it lists them.
    return StructuredOutput("json", json.dumps(schema, ensure_ascii=False))


def _text_spec(kind: str, text: str, param: str) -> StructuredOutput:
    if not text.strip():
        raise bad_request(f"{param} must not be empty.", param)
    return StructuredOutput(kind, text)


def _choice_spec(choices: list[str], param: str) -> StructuredOutput:
    if not choices:
        raise bad_request(f"{param} must list at least one string.", param)
    if any(c == "" for c in choices):
        raise bad_request(f"{param} must not hold an empty string.", param)
    return StructuredOutput("choice", json.dumps(choices, ensure_ascii=False))
