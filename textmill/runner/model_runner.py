"""ModelRunner: the device side of one engine step (implements engine.runner_protocol.Runner).

execute() = build batch -> model.forward over the flat batch with a paged AttentionContext
-> logits only for the rows that need them -> sample / score -> one host sync.
"""
from __future__ import annotations

import logging
import threading

import torch

from textmill.config import CacheConfig, ModelConfig
from textmill.messages import RunnerOutput, ScheduledChunk, SchedulerOutput, TokenLogprob
from textmill import kernels as cpp_kernels
from textmill.runner.batch import PromptSegment, build_batch
from textmill.runner.decode_graphs import DecodeGraphs, accepts as pure_decode
from textmill.runner.block_tables import BlockTables
from textmill.runner.kernel_attention import KernelPagedAttention
from textmill.loader.load import LoadedModel
from textmill.runner.file_weights import install_file_weights
from textmill.runner.gemma4_forward import Gemma4KernelForward
from textmill.runner.hybrid_forward import HybridKernelForward
from textmill.runner.kernel_forward import GemmaKernelForward, KernelForward, KernelForwardBase
from textmill.runner.kv_cache import KVCache, PagedAttention
from textmill.runner.plan import ExecutionPlan
from textmill.runner.qlinear import reuse_output
from textmill.runner.recurrent_state import RecurrentStates, StepStates
from textmill.runner.quant import install_linears
from textmill.runner.sampler import PromptLogprobOutput, SampleOutput, Sampler

log = logging.getLogger(__name__)

LOGITS_BUFFER_BYTES = 64 << 20


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        quantization: str = "none",
        fast_linears: bool = True,
        kernels: bool = True,
        file_weights: LoadedModel | None = None,
        kv_dtype: torch.dtype | None = None,
        vocab_limit: int | None = None,
        grammars=None,
        decode_graphs: bool | None = None,
        state_slots: int = 64,
    ):
        """`file_weights`: a model loaded with load_model(codes=True); its linears and
        embedding become kernel layers over the file's own blocks (runner/file_weights.py).
        `vocab_limit`: the tokenizer's vocabulary when the model's embedding is padded past
        it; ids from there on get no probability (they have no text to detokenize).
        `grammars`: the server's grammar compiler (textmill/grammar), for structured outputs.
        `decode_graphs`: run pure decode steps padded to fixed shapes (decode_graphs.py),
        captured as CUDA graphs on CUDA; None: on CUDA only. True on the CPU runs the padded
        steps op by op (tests).
        `state_slots`: the most requests that run at once (max_num_seqs): a model with recurrent
        layers keeps a state per running request (runner/recurrent_state.py)."""
        self.model = model
        self.model_config = model_config
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < model_config.vocab_size else None
        self.cache_config = cache_config
        self.device = torch.device(device)
        # textmill's C++ kernels (textmill/kernels) serve float32 on the CPU: paged attention
        # for every model, and for the Llama family a whole forward pass of fused calls.
        # Without them (another dtype or device, no compiler, kernels=False) the eager path.
        self.ops = (cpp_kernels.load("layer")
                    if kernels and fast_linears and self.device.type == "cpu" and dtype == torch.float32 else None)
        if file_weights is not None and file_weights.codes:
            if self.ops is None:
                raise ValueError("a model loaded as group codes runs only on the C++ kernels")
            self.linears = install_file_weights(model, file_weights.codes, file_weights.embedding,
                                                file_weights.tables)
        else:  # packed bf16 / int8 / int4 kernels replace the model's nn.Linear layers (quant.py)
            self.linears = (install_linears(model, model_config.vocab_size, self.device, dtype, quantization,
                                            kernels=self.ops is not None)
                            if fast_linears else "nn.Linear")
        self.forward = model.forward
        if self.ops is not None:
            # The LM head's logits go into one reused buffer (runner/row_buffer.py): a fresh
            # (rows, V) tensor each step cost a page fault per 4 KiB. Up to 64 MiB: 64 rows
            # of a 262k vocabulary; a step with more rows (long prompt logprobs) allocates.
            reuse_output(getattr(model, "lm_head", None), max_bytes=LOGITS_BUFFER_BYTES)
            for kind in (KernelForward, GemmaKernelForward, Gemma4KernelForward):
                if kind.supports(model):
                    self.forward = kind(model, self.ops)
            if HybridKernelForward.supports(model):  # recurrent layers on kernels of their own
                recurrent = cpp_kernels.load("recurrent")
                if recurrent is None:
                    raise ValueError("the recurrent layers' kernels (kernels/csrc/recurrent.cpp) could not be built")
                self.forward = HybridKernelForward(model, self.ops, recurrent)
        # The kernel forwards finish the last layer for the rows a step reads only, and Gemma 4's own
        # forward its shared layers (`keep`); other forwards give every row.
        self._forward_keeps_rows = isinstance(self.forward, KernelForwardBase) or getattr(
            model, "forward_keeps_rows", False)
        # A hybrid's recurrent layers (Qwen3.5, LFM2): a state per running request, handed to the forward
        # each step.
        self.states = (RecurrentStates(model_config, state_slots, self.device, cache_config.state_snapshots)
                       if model_config.recurrent_layers else None)
        if decode_graphs is None:  # (the padded steps have no recurrent states to hand over)
            decode_graphs = self.device.type == "cuda" and self.states is None
        if decode_graphs and self.ops is not None:  # the padded steps run the model's own forward
            raise ValueError("padded decode steps run the eager forward, not the CPU kernels")
        if decode_graphs and self.states is not None:
            raise ValueError("padded decode steps hand no recurrent states to the forward")
        self.kv_cache = KVCache(model_config, cache_config, self.device, dtype, kv_dtype=kv_dtype,
                                scratch_block=decode_graphs)
        self.graphs = (DecodeGraphs(model, self.kv_cache, self.device, capture=self.device.type == "cuda")
                       if decode_graphs else None)
        # Each request's block table, kept from step to step (the scheduler sends new blocks only).
        self.block_tables = BlockTables(cache_config.block_size)
        # OpenMP thread counts are per thread: oneDNN in a thread that never set one uses
        # every core, whatever torch.set_num_threads said elsewhere. execute() re-applies
        # the count (set before this runner was built) in whichever thread runs the steps.
        self._num_threads = torch.get_num_threads()
        self._threads_set_in: int | None = None
        # The sampler holds all per-request state: params, seeded generator, bias, and the
        # counts of tokens this runner sampled (for penalties). Preemption keeps it.
        self.sampler = Sampler(model_config.vocab_size, self.device, grammars=grammars, ops=self.ops)

    @classmethod
    def from_plan(cls, loaded: LoadedModel, cache_config: CacheConfig, plan: ExecutionPlan,
                  vocab_limit: int | None = None, grammars=None, state_slots: int = 64) -> "ModelRunner":
        """The runner runner/plan.py decided on, for a model loaded in the plan's format."""
        return cls(loaded.model, loaded.config, cache_config, device=plan.device, dtype=plan.torch_dtype,
                   vocab_limit=vocab_limit, grammars=grammars, state_slots=state_slots,
                   decode_graphs=plan.cuda_graphs and not loaded.config.recurrent_layers,
                   quantization=plan.quantization, kernels=plan.kernels, kv_dtype=plan.torch_kv_dtype,
                   file_weights=loaded if plan.weights == "file-codes" else None)

    @property
    def chunks_match_steps(self) -> bool:
        """A position's logits are the same bits in a chunk of several tokens as in a one-token
        step: true of the C++ kernel forwards (their linears, norms and attention compute each
        row alike whatever the rows beside it), which the tests hold to it; not of eager torch,
        whose matmuls and attention choose their order by shape. Guessed tokens are exact only
        where it holds (engine/ngram_draft.py), so the engine turns them off elsewhere. (A hybrid's
        recurrent states take in the rejected guesses too: execute() puts them back, _rewind.)"""
        return self.ops is not None and isinstance(self.forward, KernelForwardBase) and self.graphs is None

    @staticmethod
    def kv_bytes_per_block(model_config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype,
                           kv_dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V, all layers, for one block: the CLI sizes the pool with it."""
        return KVCache.bytes_per_block(model_config, cache_config, dtype, kv_dtype=kv_dtype)

    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        if self._threads_set_in != threading.get_ident():
            torch.set_num_threads(self._num_threads)
            self._threads_set_in = threading.get_ident()
        self._update_requests(scheduled)
        if scheduled.is_empty:
            return RunnerOutput()
        with torch.inference_mode():
            if self.graphs is not None and self.graphs.failed is None and pure_decode(scheduled):
                logits = self.graphs.run(scheduled, self.block_tables)
                if logits is None:  # its capture failed: this step and every later one run eagerly
                    log.warning("CUDA graph capture failed, decode steps run eagerly from now on: %s",
                                self.graphs.failed)
                else:
                    return self._sample_and_score(tuple(c.request_id for c in scheduled.chunks), (), None,
                                                  self._limit_vocab(logits))
            batch = build_batch(scheduled, self.block_tables, self.device)
            if self.ops is not None:
                ctx = KernelPagedAttention(self.kv_cache, batch.attn, self.ops)
            else:
                ctx = PagedAttention(self.kv_cache, batch.attn, grouped_decode=self._num_threads > 1)
            rows = batch.logits_rows
            drafts = {c.request_id: c.draft for c in scheduled.chunks if c.draft}
            extra, saved = {}, None
            if self.states is not None:
                ordered = tuple(scheduled.chunks[i] for i in batch.order)
                extra["states"] = self.states.for_step(ordered, record=bool(drafts))
                if drafts:  # the guessing requests' states as they were, for _rewind
                    saved = self.states.checkpoint([self.states.slot_of(r) for r in drafts])
            if self._forward_keeps_rows:
                hidden = self.forward(batch.input_ids, batch.positions, ctx, keep=rows, **extra)  # (S + P, C)
            else:
                hidden = self.forward(batch.input_ids, batch.positions, ctx, **extra).index_select(0, rows)
            if self.states is not None:  # (a chunk with guesses keeps none: the rewind may change it)
                self.states.save(scheduled.chunks)
            if rows.numel() == 0:
                return RunnerOutput()  # only mid-prompt chunks: nothing to sample or score
            logits = self.model.logits(hidden)  # (S + P, V)
            out = self._sample_and_score(batch.sample_request_ids, batch.prompt_segments, batch.prompt_targets,
                                         self._limit_vocab(logits), drafts)
            if saved is not None:
                self._rewind(extra["states"], ordered, drafts, out, saved)
            return out

    def _rewind(self, states: StepStates, ordered: tuple[ScheduledChunk, ...], drafts: dict[str, tuple[int, ...]],
                out: RunnerOutput, saved: dict[int, list[torch.Tensor]]) -> None:
        """The recurrent states of requests whose guesses were rejected, put back to before the step
        and advanced by the rows kept (the last real token and the guesses sampling confirmed)."""
        for chunk, (first, _, slot) in zip(ordered, states.rows):
            draft = drafts.get(chunk.request_id)
            kept = len(out.accepted.get(chunk.request_id, ()))
            if draft is not None and kept < len(draft):
                self.states.restore(slot, saved)
                rows = torch.arange(first, first + len(chunk.token_ids) - len(draft) + kept)
                self.forward.replay(states, rows, slot)

    def _limit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        assert logits.shape[-1] == self.model_config.vocab_size, "logits width != vocab_size"
        if self.vocab_limit is not None:
            logits[:, self.vocab_limit:] = float("-inf")
        return logits

    def _update_requests(self, scheduled: SchedulerOutput) -> None:
        self.block_tables.update(scheduled)
        if self.states is not None:
            self.states.update(scheduled)
        for request_id in scheduled.finished_request_ids:
            self.sampler.remove_request(request_id)
        for new in scheduled.new_requests:
            # A request sent again (e.g. resumed after preemption) keeps its generator and
            # penalty counts: its tokens must not depend on having been preempted.
            if new.request_id not in self.sampler:
                self.sampler.add_request(new.request_id, new.params, new.prompt_token_ids)

    def _sample_and_score(self, sample_ids: tuple[str, ...], segments: tuple[PromptSegment, ...],
                          prompt_targets: torch.Tensor | None, logits: torch.Tensor,
                          drafts: dict[str, tuple[int, ...]] | None = None) -> RunnerOutput:
        """logits: (S + P, V), the S sampled rows (of sample_ids) then the P prompt rows.
        `drafts`: the guessed tokens of the chunks that carry some; such a request has
        len(draft) + 1 sampled rows, one after each position from its last real token on.
        A draftable request's row samples as if it were alone (SamplingParams.draftable):
        what the rows after a rejected guess sampled is dropped and changes nothing, their
        draws included (the generator is rewound to the kept rows' draws)."""
        num_sampled = len(sample_ids)
        drafts = drafts or {}
        # A sampled request draws one uniform a row: where its generator stood, so that only
        # the rows it keeps count (a guess is kept only where the draw picked that token).
        marks = {r: self.sampler.draw_mark(r) for r in drafts if not self.sampler.params(r).greedy}
        sample = self.sampler.sample(logits[:num_sampled], sample_ids, in_place=True) if num_sampled else None
        prompt = None
        if segments:
            k = max(self._prompt_k(seg.request_id) for seg in segments)
            prompt = self.sampler.prompt_logprobs(logits[num_sampled:], prompt_targets, k)
        # The one host sync of the step: every result in one float64 tensor (token ids are
        # exact in float64), read back with a single .tolist().
        pieces = []
        if sample is not None:
            pieces += [sample.token_ids, sample.logprobs, sample.top_ids, sample.top_logprobs]
        if prompt is not None:
            pieces += [prompt.logprobs, prompt.top_ids, prompt.top_logprobs, prompt.ranks]
        values = torch.cat([p.reshape(-1).to(torch.float64) for p in pieces]).tolist()
        reader = _Reader(values)
        rows = self._read_sampled(sample_ids, sample, reader) if sample is not None else {}
        prompt_lps = self._read_prompt(segments, prompt, reader) if prompt is not None else {}
        sampled, accepted = {}, {}
        for request_id, entries in rows.items():
            draft = drafts.get(request_id, ())
            kept = 0  # guesses confirmed: each equals the token sampled at the position before it
            while kept < len(draft) and entries[kept].token_id == draft[kept]:
                kept += 1
            if request_id in marks:
                self.sampler.rewind_draws(request_id, marks[request_id], kept + 1)
            sampled[request_id] = entries[kept]
            if kept:
                accepted[request_id] = tuple(entries[:kept])
        return RunnerOutput(sampled=sampled, prompt_logprobs=prompt_lps, accepted=accepted)

    def _prompt_k(self, request_id: str) -> int:
        return self.sampler.params(request_id).prompt_logprobs or 0

    def _read_sampled(self, sample_ids: tuple[str, ...], sample: SampleOutput, reader: "_Reader"
                      ) -> dict[str, list[TokenLogprob]]:
        num, k = len(sample_ids), sample.top_ids.shape[1]
        tokens, lps = reader.take(num), reader.take(num)
        top_ids, top_lps = reader.take(num * k), reader.take(num * k)
        out = {}
        for i, request_id in enumerate(sample_ids):
            want = min(self.sampler.params(request_id).logprobs or 0, k)
            top = tuple((int(top_ids[i * k + j]), top_lps[i * k + j]) for j in range(want))
            out.setdefault(request_id, []).append(TokenLogprob(int(tokens[i]), lps[i], top))
        return out

    def _read_prompt(self, segments: tuple[PromptSegment, ...], prompt: PromptLogprobOutput, reader: "_Reader"
                     ) -> dict[str, tuple[TokenLogprob, ...]]:
        num, k = prompt.logprobs.shape[0], prompt.top_ids.shape[1]
        lps = reader.take(num)
        top_ids, top_lps = reader.take(num * k), reader.take(num * k)
        ranks = reader.take(num)
        out = {}
        for seg in segments:
            want = min(self._prompt_k(seg.request_id), k)
            entries = []
            for row in range(seg.offset, seg.offset + seg.count):
                top = tuple((int(top_ids[row * k + j]), top_lps[row * k + j]) for j in range(want))
                entries.append(TokenLogprob(seg.targets[row - seg.offset], lps[row], top, int(ranks[row])))
            out[seg.request_id] = tuple(entries)
        return out


class _Reader:
    """Walks the flat list of one step's results, piece by piece."""

    def __init__(self, values: list[float]):
        self.values = values
        self.pos = 0

    def take(self, n: int) -> list[float]:
        chunk = self.values[self.pos : self.pos + n]
        self.pos += n
        return chunk
