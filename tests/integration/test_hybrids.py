"""Tiny hybrids (Qwen3.5 and LFM2, and their mixtures of experts, written as llama.cpp's converter
writes them, Q8_0; tests/parity/tiny_hybrids.py) served end to end on the default plan: the file's blocks
on the kernel forward, the real app and engine, through the official openai client.

What a hybrid adds to the path: recurrent layers (gated delta nets, short convolutions) whose memory
of a request is a state the runner keeps per running request, carried across chunks, and a prefix
cache whose hits resume from kept states. A prompt prefilled in chunks of 8 must score its own
continuation exactly as generation gave it (echo); requests running side by side, n > 1 included,
must each get what they get alone; a hit must give what computing the prefix gives.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from tests.parity.tiny_hybrids import FAMILIES, tiny_file
from textmill.config import EngineConfig, ServerConfig
from textmill.loader import load_model
from textmill.runner import ModelRunner

from .server import free_port, running_server

pytest.importorskip("transformers")

NAME = "tiny-hybrid"
# The state machinery's own tests (preemption, abandoned streams) on the dense families alone: a
# mixture of experts changes the MLP, not the states.
STATE_FAMILIES = ("qwen35", "lfm2")
PROMPT = "the cat sat on the mat and the dog sat on the log while the bird sang in the tree"
@pytest.fixture(scope="module", params=tuple(FAMILIES))
def client(request, tmp_path_factory):
    path = tiny_file(request.param, tmp_path_factory.mktemp(request.param))
    options = EngineConfig(model=str(path)).updated(max_model_len=256, memory_gib=0.05, max_num_batched_tokens=8,
                                                    max_num_seqs=4, draft_tokens=0)  # the plain server
    with running_server(options, ServerConfig(port=free_port(), served_model_name=NAME)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_echo_scores_a_continuation_as_generation_gave_it(client) -> None:
    gen = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1,
                                    extra_body={"return_token_ids": True})
    [choice] = gen.choices
    ids = choice.model_extra["prompt_token_ids"] + choice.model_extra["token_ids"]
    assert choice.finish_reason == "length" and len(ids) > 8 + 12  # in chunks of 8
    scored = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    tail = scored.choices[0].logprobs.token_logprobs[-len(choice.logprobs.token_logprobs):]
    assert tail == choice.logprobs.token_logprobs


def test_requests_side_by_side_get_what_they_get_alone(client) -> None:
    """Six requests on four state slots (max_num_seqs 4): each its own state, slots reused as
    requests finish; the same prompt with n=2 and a seed gives two candidates as two requests do."""
    prompts = [f"{PROMPT} {i}" for i in range(6)]
    kwargs = dict(model=NAME, max_tokens=10, temperature=0)
    alone = [client.completions.create(prompt=p, **kwargs).choices[0].text for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: client.completions.create(prompt=p, **kwargs).choices[0].text, prompts))
    assert together == alone
    sampled = dict(model=NAME, prompt=PROMPT, max_tokens=10, temperature=0.9, seed=5)
    first, second = ([c.text for c in sorted(client.completions.create(n=2, **sampled).choices,
                                              key=lambda c: c.index)] for _ in range(2))
    assert first == second and first[0] != first[1]


def test_prefix_hits_resume_from_kept_states(client, tmp_path_factory, request) -> None:
    """A prompt sent again, then a next turn (the first answer and new text): both served from the
    prefix cache (cached_tokens, resuming from the recurrent state kept at a prompt's or an answer's
    last block boundary), each answer token for token and log-prob for log-prob what a server
    without the cache gives."""
    from .server import running_server

    kwargs = dict(model=NAME, max_tokens=24, temperature=0, logprobs=1, extra_body={"return_token_ids": True})
    first = client.completions.create(prompt=PROMPT, **kwargs)
    ids = first.choices[0].model_extra["prompt_token_ids"]
    turn2 = ids + first.choices[0].model_extra["token_ids"] + ids[:7]
    again, second = (client.completions.create(prompt=p, **kwargs) for p in (ids, turn2))
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in (again, second)]
    assert cached == [(len(ids) - 1) // 16 * 16, (len(ids) + 23) // 16 * 16], cached  # blocks of 16
    family = request.node.callspec.params["client"]
    path = tiny_file(family, tmp_path_factory.mktemp(family))
    options = EngineConfig(model=str(path)).updated(max_model_len=256, memory_gib=0.05, max_num_batched_tokens=8,
                                                    max_num_seqs=4, draft_tokens=0, enable_prefix_caching=False)
    with running_server(options, ServerConfig(port=free_port(), served_model_name=NAME)) as url:
        plain = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        want = [plain.completions.create(prompt=p, **kwargs).choices[0] for p in (ids, turn2)]
    got = [again.choices[0], second.choices[0]]
    assert [(c.text, c.logprobs.token_logprobs) for c in got] == [(c.text, c.logprobs.token_logprobs) for c in want]
    assert got[0].text == first.choices[0].text


def test_seeded_samples_repeat_and_streams_match(client) -> None:
    kwargs = dict(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=11)
    first = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert first == streamed and first


def test_guessed_tokens_change_nothing(request, client, tmp_path_factory) -> None:
    """A server that guesses tokens (priced as nearly free, so it guesses) answers as one that does
    not, token for token and log-prob for log-prob, several requests at once: rejected guesses went
    through the recurrent layers and were taken back (runner/model_runner.py _rewind). The random
    model's text never repeats, so a logit bias keeps each answer to two tokens, in an order the
    model picks: some guesses hold, some do not."""
    from .server import serving
    from .test_draft_tokens import CountingRunner, RowsNearlyFree

    family = request.node.callspec.params["client"]
    path = tiny_file(family, tmp_path_factory.mktemp(family))
    counting = []

    def wrap(runner):
        counting.append(CountingRunner(runner))
        return counting[-1]

    options = EngineConfig(model=str(path)).updated(max_model_len=256, memory_gib=0.05, max_num_seqs=4)
    prompts = ["the cat sat on the mat. the cat sat on the mat. the cat", "1 2 3 1 2 3 1 2 3 1 2", PROMPT]
    with serving(ServerConfig(served_model_name=NAME), options.updated(draft_tokens=4), wrap_runner=wrap) as guessing:
        guessing.app.state.serving.engine._engine._scheduler.step_costs = RowsNearlyFree()
        url = guessing.url
        guesser = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        kwargs = dict(model=NAME, max_tokens=40, temperature=0, logprobs=1, logit_bias={"100": 30, "101": 30})
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: guesser.completions.create(prompt=p, **kwargs).choices[0], prompts))
    want = [client.completions.create(prompt=p, **kwargs).choices[0] for p in prompts]
    assert [(c.text, c.logprobs.token_logprobs) for c in got] == [(c.text, c.logprobs.token_logprobs) for c in want]
    assert counting[0].accepted > 0 and counting[0].drafted > counting[0].accepted  # some held, some were taken back


@pytest.mark.parametrize("family", STATE_FAMILIES)
def test_preempted_requests_get_what_they_get_alone(family, tmp_path_factory) -> None:
    """A server whose KV pool holds 160 tokens, given four requests of ~70: the scheduler preempts
    some and recomputes them from position 0, each into a fresh recurrent state, and every answer
    (greedy and seeded) is the one it gives alone."""
    from .server import alone_then_together, running_server

    path = tiny_file(family, tmp_path_factory.mktemp(family))
    config = EngineConfig(model=str(path)).updated(max_model_len=128, max_num_seqs=4)
    per_token = ModelRunner.kv_bytes_per_block(
        load_model(path, codes=True).config, config.cache, torch.float32, torch.float16) // config.cache.block_size
    options = config.updated(memory_gib=160 * per_token / 2**30)
    cases = [dict(prompt=f"{PROMPT} {i}", max_tokens=40, **(dict(temperature=0) if i % 2 else
                                                              dict(temperature=0.9, seed=i))) for i in range(4)]
    with running_server(options, ServerConfig(port=free_port(), served_model_name=NAME)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        alone, together, preemptions = alone_then_together(
            url, lambda kw: client.completions.create(model=NAME, **kw).choices[0].text, cases)
    assert preemptions > 0 and together == alone


@pytest.mark.parametrize("family", STATE_FAMILIES)
def test_abandoned_streams_give_their_states_back(family, tmp_path_factory) -> None:
    """Clients that close their streams mid-generation: the engine aborts them and the runner takes
    their state slots back, so more abandoned streams than slots (max_num_seqs 2) leave the server
    answering, every slot free again."""
    from .ops_server import wait_for
    from .server import serving

    path = tiny_file(family, tmp_path_factory.mktemp(family))
    options = EngineConfig(model=str(path)).updated(max_model_len=256, memory_gib=0.05, max_num_seqs=2)
    with serving(ServerConfig(served_model_name=NAME), options) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=120)
        states = running.app.state.serving.engine._engine._runner.states
        for _ in range(5):
            stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=200, stream=True)
            next(iter(stream))
            stream.close()
        assert wait_for(lambda: len(states._free) == 2)
        alone = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
        with ThreadPoolExecutor(3) as pool:
            again = list(pool.map(lambda _: client.completions.create(
                model=NAME, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text, range(3)))
        assert again == [alone] * 3
