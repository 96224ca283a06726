"""Guessed tokens (prompt lookup) through the real server: the answers of a server that
guesses are those of one that does not, token for token and logprob for logprob.

The kernels compute a position's logits bit for bit the same in a chunk of several tokens
as in a one-token step; these tests hold the whole path to that (scheduler, batch rows,
sampler, acceptance, streaming) on the bundled model.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from textmill.config import ServerConfig
from textmill.engine.step_costs import StepCosts

from .conftest import MODEL
from .ops_server import scrape
from .server import TEST_OPTIONS, serving

NO_EOS = {"0": -100, "2": -100}
PROMPTS = [
    "def add_one(x):\n    return x + 1\n\ndef add_two(x):\n    return x + 2\n\ndef add_three(x):\n",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "The cat sat on the mat. The cat sat on the mat. The cat",
]


class CountingRunner:
    """The real runner, counting the chunks that carried guesses and the guesses kept."""

    def __init__(self, runner):
        self.runner = runner
        self.drafted = self.accepted = self.shared_steps = 0

    def execute(self, scheduled):
        out = self.runner.execute(scheduled)
        self.drafted += sum(len(c.draft) for c in scheduled.chunks)
        self.shared_steps += sum(1 for c in scheduled.chunks if c.draft) > 1  # several requests guessed
        self.accepted += sum(len(a) for a in out.accepted.values())
        return out

    def __getattr__(self, name):
        return getattr(self.runner, name)


class RowsNearlyFree(StepCosts):
    """Times every decode step as one that only streams the weights (each row 2% more),
    whatever the machine's load: which steps carry guesses must not hang on a shared CI
    machine's noise. These tests are about exactness; the pricing has its own
    (tests/unit/test_step_costs.py, tests/unit/test_ngram_draft.py)."""

    def record(self, rows, seconds):
        super().record(rows, 0.01 * (1 + 0.02 * rows))


@pytest.fixture(scope="module")
def servers():
    counting = []

    def wrap(runner):
        counting.append(CountingRunner(runner))
        return counting[-1]

    with serving(ServerConfig(), TEST_OPTIONS.updated(draft_tokens=4), wrap_runner=wrap) as guessing, \
            serving(ServerConfig(), TEST_OPTIONS.updated(draft_tokens=0)) as plain:
        guessing.app.state.serving.engine._engine._scheduler.step_costs = RowsNearlyFree()
        clients = [openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=300)
                   for s in (guessing, plain)]
        yield clients, counting[0], guessing.url


def answer(client, **body):
    response = client.completions.create(model=MODEL, temperature=0, **body)
    choice = response.choices[0]
    lp = choice.logprobs
    return (choice.text, choice.finish_reason, response.usage.completion_tokens,
            lp and (lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_guessing_gives_the_same_tokens_and_logprobs(servers, prompt):
    (guessing, plain), counter, _ = servers
    before = counter.accepted
    body = dict(prompt=prompt, max_tokens=48, logprobs=2, logit_bias=NO_EOS)
    assert answer(guessing, **body) == answer(plain, **body)
    assert counter.accepted > before, "the repetitive prompt should have confirmed some guesses"


def test_requests_guessing_in_one_step_get_their_own_answers(servers):
    """Several streams at once, guessing in the same steps (rows priced as nearly free):
    every answer is the plain server's."""
    (guessing, plain), counter, _ = servers
    before = counter.shared_steps
    bodies = [dict(prompt=p, max_tokens=40, logprobs=1, logit_bias=NO_EOS) for p in PROMPTS]
    with ThreadPoolExecutor(len(bodies)) as pool:
        got = list(pool.map(lambda body: answer(guessing, **body), bodies))
    assert got == [answer(plain, **body) for body in bodies]
    assert counter.shared_steps > before


def test_stop_strings_max_tokens_and_streaming_end_where_they_would(servers):
    (guessing, plain), counter, _ = servers
    for body in (dict(prompt=PROMPTS[1], max_tokens=7, logit_bias=NO_EOS),
                 dict(prompt=PROMPTS[1], max_tokens=40, stop=[" 20,"], logit_bias=NO_EOS),
                 dict(prompt=PROMPTS[0], max_tokens=40, stop=["four"], logprobs=1),
                 dict(prompt=PROMPTS[2], max_tokens=1)):
        assert answer(guessing, **body) == answer(plain, **body), body
    # A stop string that ends among one step's confirmed guesses ends the text there, and the
    # tokens after it count nowhere (usage, best_of's mean logprob); of two overlapping stops
    # the one that ends first wins, as with one token a step.
    for prompt, stop in ((PROMPTS[1], [", "]), (PROMPTS[1], ["4, "]), (PROMPTS[2], ["on"]),
                         (PROMPTS[2], ["on", "sat on the"]), (PROMPTS[2], ["mat", "the mat. The"])):
        body = dict(prompt=prompt, max_tokens=30, stop=stop, logprobs=1, logit_bias=NO_EOS)
        assert answer(guessing, **body) == answer(plain, **body), stop
        body = dict(prompt=prompt, max_tokens=12, stop=stop, n=2, best_of=3, logit_bias=NO_EOS)
        got = guessing.completions.create(model=MODEL, temperature=0.9, seed=3, **body)
        want = plain.completions.create(model=MODEL, temperature=0.9, seed=3, **body)
        assert [c.text for c in got.choices] == [c.text for c in want.choices]
        assert got.usage == want.usage
    stream = guessing.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                         logit_bias=NO_EOS, stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text == answer(plain, prompt=PROMPTS[1], max_tokens=30, logit_bias=NO_EOS)[0]


def test_seeded_sampling_draws_the_same_tokens(servers):
    """A sampled request guesses too; the runner rewinds its generator past the draws of the
    rows it drops, so a seed gives the text it gives without guesses."""
    (guessing, plain), counter, _ = servers
    before = counter.accepted
    for seed, temperature, extra in ((7, 0.3, {}), (11, 0.8, {"top_p": 0.9}), (5, 1.0, {"logprobs": 2})):
        body = dict(prompt=PROMPTS[1], max_tokens=40, logit_bias=NO_EOS, seed=seed, **extra)
        got = guessing.completions.create(model=MODEL, temperature=temperature, **body).choices[0]
        want = plain.completions.create(model=MODEL, temperature=temperature, **body).choices[0]
        assert (got.text, got.logprobs) == (want.text, want.logprobs)
    assert counter.accepted > before


def test_penalized_requests_do_not_guess(servers):
    (guessing, plain), counter, _ = servers
    before = counter.drafted
    for extra in (dict(frequency_penalty=0.5), dict(presence_penalty=-0.5), dict(extra_body={"min_tokens": 3})):
        body = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0, logit_bias=NO_EOS, **extra)
        assert guessing.completions.create(**body).choices[0].text == plain.completions.create(**body).choices[0].text
    assert counter.drafted == before


def test_metrics_count_the_guesses(servers):
    (guessing, _), counter, url = servers
    guessing.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0, logit_bias=NO_EOS)
    samples = scrape(url)
    assert samples["vllm:spec_decode_num_draft_tokens_total"] == counter.drafted > 0
    assert samples["vllm:spec_decode_num_accepted_tokens_total"] == counter.accepted > 0
    assert 0 < samples["vllm:spec_decode_num_drafts_total"] <= counter.drafted


def test_plans_whose_chunks_are_not_one_token_steps_do_not_guess():
    """Eager torch picks its matmul and attention order by shape: a chunk's logits may differ
    in the last bits from one-token steps, so there guesses would not be exact."""
    from textmill.wiring import build_engine

    built = build_engine(TEST_OPTIONS.updated(kernels=False, draft_tokens=4))
    assert built.engine._scheduler.drafter is None
    built = build_engine(TEST_OPTIONS.updated(draft_tokens=4))
    assert built.engine._scheduler.drafter is not None
