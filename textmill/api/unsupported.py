"""Fields textmill knows from vLLM or llama.cpp but does not implement.

Sent with a value that asks for their behaviour, each is a 400 with code
"unsupported_parameter" naming it: a client that relies on one must hear that it did not
happen, never get a 200 that silently ignored it. Sent with their "off" value (what some
clients send by default), they pass. Fields nobody knows keep the old behaviour: ignored
and logged at debug level.
"""
from __future__ import annotations

from typing import Any, Callable

from textmill.api.constraints import unsupported
from textmill.api.protocol import CompletionRequest


def _set(v: Any) -> bool:
    return v is not None


def _true(v: Any) -> bool:
    return v is not None and v is not False


def _not(*off: Any) -> Callable[[Any], bool]:
    return lambda v: v is not None and v not in off


# field -> (asks for the behaviour?, what to do instead)
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    # vLLM
    "prompt_embeds": (_set, "send the prompt as text or token ids"),
    "use_beam_search": (_true, "use best_of for several candidates ranked by logprob"),
    "length_penalty": (_not(1, 1.0), "it only applies to beam search"),
    "include_stop_str_in_output": (_true, "the stop string is always left out of the text"),
    "logits_processors": (lambda v: bool(v), "use logit_bias, allowed_token_ids or bad_words"),
    "return_tokens_as_token_ids": (_true, "use return_token_ids"),
    "skip_special_tokens": (lambda v: v is False, None),
    "spaces_between_special_tokens": (lambda v: v is False, None),
    "add_special_tokens": (lambda v: v is False, "send the prompt as token ids to control them"),
    "priority": (_not(0), "requests are served first come, first served"),
    "kv_transfer_params": (_set, None),
    "vllm_xargs": (lambda v: bool(v), None),
    "cache_salt": (_set, None),
    "lora_request": (_set, "this server serves one model without adapters"),
    "guided_whitespace_pattern": (_set, "constrained JSON is written compactly"),
    # llama.cpp
    "lora": (lambda v: bool(v), "this server serves one model without adapters"),
    "n_probs": (_not(0), "use logprobs"),
    "n_predict": (_not(-1), "use max_tokens"),
    "mirostat": (_not(0), None),
    "typical_p": (_not(1, 1.0), None),
    "tfs_z": (_not(1, 1.0), None),
    "dynatemp_range": (_not(0, 0.0), None),
    "dry_multiplier": (_not(0, 0.0), None),
    "xtc_probability": (_not(0, 0.0), None),
    "top_n_sigma": (_not(-1, -1.0), None),
    "samplers": (_set, None),
    "image_data": (_set, "this server reads text only"),
}


def reject_unsupported(req: CompletionRequest) -> None:
    extra = req.model_extra or {}
    for field, (asks, instead) in UNSUPPORTED.items():
        if field in extra and asks(extra[field]):
            hint = f"; {instead}" if instead else ""
            raise unsupported(field, f"{field} is not supported by this server{hint}.")
