"""Pydantic models for the wire format, following ../shared/spec/completions.openapi.yaml.

Strict mode: a string is never coerced into a number, nor a bool into an integer, as
OpenAI's own validation refuses them. Unknown fields are kept (and logged at debug level
by the route) so that clients sending newer or vendor fields keep working.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

Prompt = Union[str, list[str], list[int], list[list[int]]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM: usage in every chunk


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object.
    Other keys vLLM knows (structural_tag, whitespace_pattern, ...) are 400s (prepare)."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)
    # "json" would shadow BaseModel.json: the field has another name and the wire name as alias.
    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format, as vLLM accepts it on completions: text, json_object, json_schema."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    json_schema: JsonSchemaFormat | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    # Nullable in the spec, with "<|endoftext|>" as the documented default: a null or
    # empty prompt generates as if from the start of a new document.
    prompt: Prompt | None
    best_of: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=0)
    n: int | None = Field(1, ge=1, le=128)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, ge=0.0, le=1.0)
    user: str | None = None
    # vLLM's extras, for clients written against it; none of them changes an OpenAI field.
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=1e6)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    # Structured outputs (api/constraints.py): vLLM's, OpenAI's response_format, llama.cpp's.
    structured_outputs: StructuredOutputs | None = None
    response_format: ResponseFormat | None = None
    json_schema: dict[str, Any] | None = None  # llama.cpp
    grammar: str | None = None  # llama.cpp: GBNF
    # vLLM's older names for structured_outputs' keys.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: the backend is llguidance
    # More of vLLM's extras.
    prompt_logprobs: int | None = Field(None, ge=0, le=5)
    return_token_ids: bool | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# ---------------------------------------------------------------- responses
class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "textmill"
    max_model_len: int | None = None
    # Whether `suffix` (fill-in-the-middle) works: the vocabulary has FIM tokens. The playground
    # shows its suffix box by it; without it a suffix is a 400.
    supports_suffix: bool | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
