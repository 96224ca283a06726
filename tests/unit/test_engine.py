"""Engine.step with the real Scheduler, the real Tokenizer and a deterministic fake runner.

The runner's "model" continues the alphabet: after a chunk ending in letter x it samples the
letter after x. So the text of every request follows from its prompt, and any mistake in
chunking, batching or detokenizing shows up in the text.
"""
from __future__ import annotations

import tokenizers

from textmill.config import CacheConfig, SchedulerConfig
from textmill.engine.engine import Engine, EngineStats
from textmill.engine.scheduler import Scheduler
from textmill.messages import EngineRequest, RequestOutput, RunnerOutput, SchedulerOutput, TokenLogprob
from textmill.sampling_params import FinishReason, SamplingParams
from textmill.tokenizer import Tokenizer, TokenizerParts

EOS = 0
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_tokenizer() -> Tokenizer:
    """id 0 = EOS, ids 1..26 = a..z."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    table = (b"</s>", *(c.encode() for c in LETTERS))
    return Tokenizer(TokenizerParts(
        backend=backend, token_bytes=table, bos_token_id=None, eos_token_id=EOS,
        eos_token_ids=frozenset({EOS}), add_bos=False, add_eos=False, fim=None))


def ids(text: str) -> tuple[int, ...]:
    return tuple(LETTERS.index(c) + 1 for c in text)


def alphabet_after(text: str, n: int) -> str:
    i = LETTERS.index(text[-1])
    return "".join(LETTERS[(i + k) % 26] for k in range(1, n + 1))


class AlphabetRunner:
    """Samples the letter after the chunk's last token; records every step it is given.

    `eos_after[request_id] = k` makes the k-th sampled token EOS; `fail_next` raises once.
    """

    def __init__(self):
        self.steps: list[SchedulerOutput] = []
        self.known: set[str] = set()  # runner-side per-request state
        self.num_sampled: dict[str, int] = {}
        self.eos_after: dict[str, int] = {}
        self.fail_next = False

    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        self.steps.append(scheduled)
        self.known -= set(scheduled.finished_request_ids)
        self.known |= {new.request_id for new in scheduled.new_requests}
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device on fire")
        sampled, prompt = {}, {}
        for chunk in scheduled.chunks:
            assert chunk.request_id in self.known
            if chunk.prompt_logprob_targets:
                prompt[chunk.request_id] = tuple(
                    TokenLogprob(t, -t / 10) for t in chunk.prompt_logprob_targets)
            if chunk.sample:
                sampled[chunk.request_id] = self._sample(chunk.request_id, chunk.token_ids[-1])
        return RunnerOutput(sampled=sampled, prompt_logprobs=prompt)

    def _sample(self, request_id: str, last: int) -> TokenLogprob:
        count = self.num_sampled[request_id] = self.num_sampled.get(request_id, 0) + 1
        token = EOS if self.eos_after.get(request_id) == count else last % 26 + 1
        return TokenLogprob(token, -0.25, ((token, -0.25),))

    def scheduled_ids(self, step: int) -> list[str]:
        return [c.request_id for c in self.steps[step].chunks]


def make_engine(num_blocks: int = 64, block_size: int = 4, **sched) -> tuple[Engine, Scheduler, AlphabetRunner]:
    sched_config = SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 64,
                                      "max_model_len": 256, **sched})
    scheduler = Scheduler(sched_config, CacheConfig(block_size=block_size, num_blocks=num_blocks))
    runner = AlphabetRunner()
    return Engine(scheduler, runner, make_tokenizer()), scheduler, runner


def request(rid: str, prompt: str, **params) -> EngineRequest:
    params.setdefault("stop_token_ids", (EOS,))
    return EngineRequest(rid, ids(prompt), SamplingParams(**params))


def run_to_end(engine: Engine, max_steps: int = 200) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        if not engine.has_unfinished:
            return outputs
    raise AssertionError("engine did not finish")


def text_of(outputs: list[RequestOutput]) -> str:
    return "".join(o.text for o in outputs)


def test_one_request_streams_to_max_tokens_and_frees_its_blocks():
    engine, scheduler, runner = make_engine()
    free_before = scheduler.kv_manager.num_free_blocks
    engine.add_request(request("a", "abc", max_tokens=5, logprobs=0))
    outs = run_to_end(engine)["a"]
    assert text_of(outs) == "defgh"
    assert [o.text for o in outs] == list("defgh")  # one token per step, released at once
    final = outs[-1]
    assert final.finished and final.finish_reason is FinishReason.LENGTH
    assert final.num_prompt_tokens == 3 and final.num_output_tokens == 5
    assert [lp.token_id for o in outs for lp in o.logprobs] == list(ids("defgh"))
    assert [off for o in outs for off in o.text_offsets] == [0, 1, 2, 3, 4]
    assert scheduler.kv_manager.num_free_blocks == free_before
    assert runner.known == set()  # the runner was told the request left


def test_requests_added_mid_flight_join_the_running_batch():
    engine, _, runner = make_engine()
    engine.add_request(request("a", "abc", max_tokens=6))
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(2):
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    engine.add_request(request("b", "mno", max_tokens=3))
    engine.add_request(request("c", "xy", max_tokens=4))
    for rid, outs in run_to_end(engine).items():
        outputs.setdefault(rid, []).extend(outs)
    # Step 2 (the third) decodes "a" and prefills "b" and "c" in the same batch.
    assert runner.scheduled_ids(2) == ["a", "b", "c"]
    assert [len(c.token_ids) for c in runner.steps[2].chunks] == [1, 3, 2]
    assert {n.request_id for n in runner.steps[2].new_requests} == {"b", "c"}
    assert text_of(outputs["a"]) == "defghi"
    assert text_of(outputs["b"]) == "pqr"
    assert text_of(outputs["c"]) == "zabc"  # wraps around the alphabet
    assert all(outs[-1].finished for outs in outputs.values())


def test_long_prompt_is_chunked_while_another_request_decodes():
    engine, _, runner = make_engine(max_num_batched_tokens=8)
    engine.add_request(request("short", "ab", max_tokens=8))
    first = engine.step()
    engine.add_request(request("long", "abcdefghijklmnopqrst", max_tokens=2))
    outputs = run_to_end(engine)
    assert text_of(outputs["long"]) == "uv" and text_of(first + outputs["short"]) == "cdefghij"
    # "short" got a token in every step while "long" was prefilled in chunks of 7.
    long_chunks = [len(c.token_ids) for s in runner.steps for c in s.chunks if c.request_id == "long"]
    assert long_chunks[:3] == [7, 7, 6]


def test_abort_ends_the_request_frees_blocks_and_leaves_others_alone():
    engine, scheduler, runner = make_engine()
    free_before = scheduler.kv_manager.num_free_blocks
    engine.add_request(request("a", "abc", max_tokens=20))
    engine.add_request(request("b", "abc", max_tokens=4))
    engine.step()
    engine.step()
    assert engine.abort("a") is True
    assert engine.abort("a") is False and engine.abort("nobody") is False
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "a"]
    assert len(aborted) == 1 and aborted[0].finished
    assert aborted[0].finish_reason is FinishReason.ABORT
    assert "a" in runner.steps[-1].finished_request_ids
    assert "a" not in runner.scheduled_ids(-1)
    rest = run_to_end(engine)
    assert "a" not in rest and rest["b"][-1].finish_reason is FinishReason.LENGTH
    assert scheduler.kv_manager.num_free_blocks == free_before


def test_abort_of_a_waiting_request():
    engine, scheduler, runner = make_engine(max_num_seqs=1)
    engine.add_request(request("a", "abc", max_tokens=3))
    engine.add_request(request("b", "abc", max_tokens=3))
    first = engine.step()
    assert scheduler.num_waiting == 1
    engine.abort("b")
    outputs = run_to_end(engine)
    outputs["a"] = first + outputs["a"]
    assert outputs["b"][-1].finish_reason is FinishReason.ABORT and outputs["b"][-1].text == ""
    assert text_of(outputs["a"]) == "def"
    assert all("b" not in [c.request_id for c in s.chunks] for s in runner.steps)


def test_runner_failure_fails_only_that_steps_requests(caplog):
    engine, scheduler, runner = make_engine(max_num_seqs=2)
    free_before = scheduler.kv_manager.num_free_blocks
    for rid in ("a", "b", "c"):  # "c" waits: max_num_seqs=2
        engine.add_request(request(rid, "abc", max_tokens=4))
    engine.step()
    runner.fail_next = True
    with caplog.at_level("ERROR", logger="textmill.engine"):
        outs = engine.step()
    assert sorted(o.request_id for o in outs) == ["a", "b"]
    for out in outs:
        assert out.finished and out.finish_reason is FinishReason.ERROR
        assert "device on fire" in out.error
    assert len([r for r in caplog.records if r.exc_info]) == 1  # logged once, with traceback
    engine.add_request(request("d", "xyz", max_tokens=2))
    outputs = run_to_end(engine)
    assert text_of(outputs["c"]) == "defg" and outputs["c"][-1].finish_reason is FinishReason.LENGTH
    assert text_of(outputs["d"]) == "ab" and outputs["d"][-1].error is None
    assert scheduler.kv_manager.num_free_blocks == free_before
    assert engine.stats().num_step_failures == 1


def test_stop_string_finishes_the_request_in_the_scheduler():
    engine, scheduler, runner = make_engine()
    engine.add_request(request("a", "abc", max_tokens=20, stop=("fg",)))
    outputs = run_to_end(engine)["a"]
    assert text_of(outputs) == "de"
    assert outputs[-1].finish_reason is FinishReason.STOP and outputs[-1].num_output_tokens == 4
    # Held back "f" was never sent; the request was not scheduled after the stop.
    assert [o.text for o in outputs] == ["d", "e", ""]
    assert sum(1 for s in runner.steps for c in s.chunks if c.request_id == "a") == 4
    assert scheduler.kv_manager.num_free_blocks == 64
    assert runner.known == set()


def test_eos_ends_without_text_and_counts_as_output():
    engine, _, runner = make_engine()
    runner.eos_after["a"] = 3
    engine.add_request(request("a", "abc", max_tokens=10, logprobs=1))
    outputs = run_to_end(engine)["a"]
    assert text_of(outputs) == "de"
    final = outputs[-1]
    assert final.finish_reason is FinishReason.STOP and final.num_output_tokens == 3
    assert all(EOS not in o.token_ids for o in outputs)
    assert sum(len(o.logprobs) for o in outputs) == 2


def test_max_tokens_zero_scores_the_prompt():
    engine, _, _ = make_engine(max_num_batched_tokens=4)
    engine.add_request(request("a", "abcdefg", max_tokens=0, prompt_logprobs=0))
    outputs = run_to_end(engine)["a"]
    assert len(outputs) == 1
    out = outputs[0]
    assert out.finished and out.finish_reason is FinishReason.LENGTH and out.text == ""
    assert out.prompt_logprobs[0] is None
    assert [lp.token_id for lp in out.prompt_logprobs[1:]] == list(ids("bcdefg"))


def test_prompt_logprobs_come_once_with_the_first_token():
    engine, _, _ = make_engine()
    engine.add_request(request("a", "abc", max_tokens=3, prompt_logprobs=1))
    outputs = run_to_end(engine)["a"]
    assert outputs[0].text == "d" and len(outputs[0].prompt_logprobs) == 3
    assert all(o.prompt_logprobs is None for o in outputs[1:])


def test_duplicate_live_id_is_refused():
    engine, _, _ = make_engine()
    engine.add_request(request("a", "abc", max_tokens=3))
    try:
        engine.add_request(request("a", "abc", max_tokens=3))
    except ValueError:
        pass
    else:
        raise AssertionError("duplicate id accepted")
    run_to_end(engine)
    engine.add_request(request("a", "abc", max_tokens=1))  # finished ids may be reused
    assert text_of(run_to_end(engine)["a"]) == "d"


def test_preemption_recomputes_without_losing_text():
    # 5 blocks of 4 tokens: two requests that each grow to 12 tokens cannot both fit.
    engine, scheduler, _ = make_engine(num_blocks=5, block_size=4)
    engine.add_request(request("a", "abcd", max_tokens=8))
    engine.add_request(request("b", "klmn", max_tokens=8))
    outputs = run_to_end(engine)
    assert text_of(outputs["a"]) == "efghijkl" and text_of(outputs["b"]) == "opqrstuv"
    stats = engine.stats()
    assert stats.num_preemptions_total >= 1
    assert scheduler.kv_manager.num_free_blocks == 5


def test_stats_snapshot():
    engine, _, _ = make_engine()
    engine.add_request(request("a", "abcdefgh", max_tokens=2))
    run_to_end(engine)
    engine.add_request(request("b", "abcdefgh", max_tokens=3))  # same prompt: prefix hits
    run_to_end(engine)
    stats = engine.stats()
    assert isinstance(stats, EngineStats)
    assert stats.num_waiting == 0 and stats.num_running == 0
    assert stats.prompt_tokens_total == 16 and stats.generation_tokens_total == 5
    assert stats.num_requests_finished == 2
    assert stats.prefix_cache_hits > 0 and stats.prefix_cache_queries >= stats.prefix_cache_hits
    assert 0.0 <= stats.kv_cache_usage <= 1.0


def test_a_token_the_tokenizer_cannot_spell_fails_only_that_request(caplog):
    # A model whose embedding has more rows than the tokenizer's table could sample such an
    # id: that request must end with an error, never hang, and the others must go on.
    engine, scheduler, runner = make_engine()
    bad_id = 10_000
    original = runner._sample
    runner._sample = lambda rid, last: (TokenLogprob(bad_id, -1.0) if rid == "bad" else original(rid, last))
    engine.add_request(request("bad", "ab", max_tokens=3))
    engine.add_request(request("good", "ab", max_tokens=3))
    outputs = run_to_end(engine)
    assert outputs["bad"][-1].finish_reason is FinishReason.ERROR
    assert text_of(outputs["good"]) == "cde" and not engine.has_unfinished
    assert scheduler.kv_manager.num_free_blocks == 64
