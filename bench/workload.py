"""The fixed benchmark workload: deterministic 64-word prompts and the request body.

Every system under test gets the same bytes: the prompt of request i depends only on
(seed, i), so two runs, or two servers, see identical traffic. Prompts differ per request
so that a prefix cache cannot turn the run into a replay; the shared-prefix workload keeps
90% of the words common to measure exactly that cache.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

# Plain English words, each one or two tokens for a BPE tokenizer, so 64 words come to
# about 70-90 prompt tokens whatever the model. A tuple: constant data, not state.
WORDS = tuple("""
time year people way day man thing woman life child world school state family student
group country problem hand part place case week company system program question work
government number night point home water room mother area money story fact month lot
right study book eye job word business issue side kind head house service friend father
power hour game line end member law car city community name president team minute idea
kid body information back parent face others level office door health person art war
history party result change morning reason research girl guy moment air teacher force
education foot boy age policy process music market sense nation plan college interest
death experience effect use class control care field development role effort rate heart
drug show leader light voice wife police mind price report decision son view relationship
town road arm difference value building action model season society tax director position
player record paper space ground form event official matter center couple site project
activity star table need court oil situation cost industry figure street image phone data
picture practice piece land product doctor wall patient worker news test movie north love
support technology step baby computer type attention film tree source organization hair
window evidence population truth song river garden bread stone cloud winter summer
""".split())

# SmolLM2's ending ids: 0 <|endoftext|> and 2 <|im_end|> (its tokenizer.ggml.eos_token_id is 2,
# <|im_end|>; textmill and llama.cpp both end on either). Other models have their own: the
# bench reads them per model from the file (bench/models.py).
SMOLLM2_EOS_TOKEN_IDS = (0, 2)


@dataclass(frozen=True)
class Workload:
    """What every request of one run asks for."""

    prompt_words: int = 64
    max_tokens: int = 64
    shared_prefix: float = 0.0  # fraction of the prompt's words common to all requests
    seed: int = 0
    temperature: float = 0.0
    eos_token_ids: tuple[int, ...] = SMOLLM2_EOS_TOKEN_IDS  # banned by logit_bias; () bans nothing
    ignore_eos: bool = True  # vLLM/llama.cpp extension, honoured by textmill and llama-server
    include_usage: bool = True  # stream_options.include_usage, for exact token counts


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def make_prompt(workload: Workload, index: int) -> str:
    """The prompt of request `index`: the shared prefix (if any), then words of its own."""
    n_shared = round(workload.prompt_words * workload.shared_prefix)
    shared = _words(random.Random(f"prefix-{workload.seed}"), n_shared)
    own = _words(random.Random(f"req-{workload.seed}-{index}"), workload.prompt_words - n_shared)
    return " ".join(shared + own)


def request_body(workload: Workload, model: str, index: int, stream: bool = True) -> dict:
    """The JSON body of request `index` for POST /v1/completions."""
    body: dict = {
        "model": model,
        "prompt": make_prompt(workload, index),
        "max_tokens": workload.max_tokens,
        "temperature": workload.temperature,
        "stream": stream,
    }
    if workload.eos_token_ids:
        body["logit_bias"] = {str(i): -100 for i in workload.eos_token_ids}
    if workload.ignore_eos:
        body["ignore_eos"] = True
    if stream and workload.include_usage:
        body["stream_options"] = {"include_usage": True}
    return body
