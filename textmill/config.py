"""Configuration: frozen dataclasses, built once in cli.py and passed down; the only home of defaults.

Nothing here reads the environment or a file; cli.py (or a test) decides every value. A
field that `textmill serve` or `generate` exposes carries its flag in its metadata
(`option()`): cli.py builds argparse from these fields, so a default and its help text
are written once, here. Fields without an option are filled by wiring.py (what the
machine and the model file resolve) or by tests.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from textmill.linear_attention import LinearAttentionShape

# The choices of the flags whose "auto" runner/plan.py resolves.
DTYPES = ("auto", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("auto", "none", "int8", "int4")
KV_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class Option:
    """How a config field appears on the command line. `flag` defaults to --field-name; a
    boolean whose default is True is switched off by its flag (--no-kernels)."""

    help: str
    flag: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # raises ValueError with the message to show
    repeatable: bool = False  # the flag may be given several times; the field is a tuple


def option(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"option": Option(help, **kw)})


def count(low: int) -> Callable[[str], int]:
    """A parser of whole numbers from `low` up (raises ValueError with the words to show)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"must be a whole number, got {text!r}") from None
        if value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        return value
    return parse


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"must be a positive number of seconds, got {text!r}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer, independent of the checkpoint format.

    The loader fills it from GGUF metadata or a Hugging Face config.json. Fields that a
    family does not use keep their defaults.
    """

    # registry key: "llama" (Mistral, Ministral 3, SmolLM3, Granite, ERNIE 4.5, EXAONE 3, InternLM2,
    # OLMoE, Mixtral, Granite MoE too), "phi3", "qwen2" (Qwen2 MoE too), "qwen3" (the VL files' text,
    # Qwen3 MoE too), "olmo2" (OLMo 3, EXAONE 4.0 too), "gemma", "gemma2", "gemma3", "gemma4", "qwen35",
    # "lfm2", "granitehybrid", "nemotron_h", "falcon_h1", "gpt2"
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # gemma2/3, OLMo 3: the sliding layers' base (unscaled)
    rope_scaling_factor: float | None = None  # linear position scaling where the config sets it
    # Per-frequency divisors of the RoPE inverse frequencies, (head_dim / 2,): Llama 3.1+
    # "llama3" scaling (HF rope_scaling, or GGUF's rope_freqs tensor), YaRN's blend
    # (loader/rope_scaling.py).
    rope_freq_factors: tuple[float, ...] | None = None
    # LongRoPE (Phi-3.5, Phi-3's 128k models) and YaRN: cos and sin scaled by this; LongRoPE's
    # divisors above are the set for the window the model was loaded to serve (the loaders choose).
    rope_attention_factor: float = 1.0
    # RoPE on the first rotary_dim values of each head, the rest passed (Phi-4-mini's 3/4 of
    # 128); None: the whole head.
    rotary_dim: int | None = None
    # Layers that take no RoPE at all (NoPE): SmolLM3's every 4th. Their q and k go to the
    # cache as projected.
    no_rope_layers: tuple[int, ...] = ()
    # Granite's multipliers (None: not used): the embedding times embedding_multiplier; each
    # layer's attention and MLP outputs times residual_multiplier as they join the residual
    # stream; attention scores times attention_scale instead of head_dim ** -0.5; logits
    # divided by logit_scale.
    embedding_multiplier: float | None = None
    residual_multiplier: float | None = None
    attention_scale: float | None = None
    logit_scale: float | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # qwen2: bias on q/k/v
    attention_out_bias: bool = False  # gpt-oss: a bias on o_proj too
    # gpt-oss: one learned logit per query head that joins each softmax over the keys and
    # takes its share of the weight with no value (the "sink").
    attention_sinks: bool = False
    qk_norm: bool = False  # qwen3, gemma3, olmo2: RMSNorm of q and k before RoPE, each head alone
    qk_norm_whole: bool = False  # olmo2 (not EXAONE 4): ... over all heads together (H x D weights)
    sliding_window: int | None = None
    # gemma2/3, OLMo 3: layer i is global when (i + 1) % pattern == 0, the others slide and take
    # the local RoPE; None means all layers global (a Llama's window, if any, in every layer).
    sliding_window_pattern: int | None = None
    query_pre_attn_scalar: float | None = None  # gemma2/3: attention scale is this ** -0.5
    # gemma2/3 norm the attention's and the MLP's outputs too; Gemma 1 (False) only their inputs.
    post_norms: bool = True
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    hidden_act: str = "silu"  # "silu" (SwiGLU), "gelu_tanh" (GeGLU), "gelu" (gpt2 MLP), "relu2" (Nemotron-H)
    # Mixture of experts (Qwen2 and 3 MoE, OLMoE, Mixtral, Granite MoE; models/moe.py), 0: a dense
    # MLP. Each token's MLP is the sum of its num_experts_per_tok likeliest experts' SwiGLUs
    # (moe_intermediate_size wide), weighted by the router's softmax, renormalized over them
    # where norm_topk_prob.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True
    dense_layers: tuple[int, ...] = ()  # layers with the dense MLP in a MoE model (Qwen3 MoE's mlp_only_layers)
    # A shared expert every token takes beside its chosen ones (Qwen2 MoE, Granite MoE shared), this
    # wide; its output times sigmoid(a learned gate) where shared_expert_gate (Qwen2 MoE).
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    # gpt-oss: the router and every expert's projections have biases, and the experts' SwiGLU
    # is clamped at this limit: (clamp(up, -limit, limit) + 1) * g * sigmoid(1.702 g) with
    # g = min(gate, limit). None: the plain SwiGLU.
    moe_bias: bool = False
    swiglu_limit: float | None = None
    # ERNIE 4.5 MoE: a per-expert bias added to the router's probabilities to choose a token's
    # experts, not to weigh them (its e_score_correction_bias; llama.cpp's exp_probs_b).
    router_selection_bias: bool = False
    # LFM2 MoE: the router's probabilities are the sigmoid of each logit, not their softmax
    # (llama.cpp's expert_gating_func 2).
    router_sigmoid: bool = False
    # Nemotron-H MoE: the chosen experts' weights times this (routed_scaling_factor; llama.cpp's
    # expert_weights_scale), after any renormalizing.
    router_scale: float = 1.0
    # Gemma 4: the global (full-attention) layers' own head width and KV head count (None: head_dim,
    # num_kv_heads); where attention_k_eq_v, those layers have no v_proj and take V from k_proj.
    global_head_dim: int | None = None
    global_kv_heads: int | None = None
    attention_k_eq_v: bool = False
    # Gemma 4: the last kv_shared_layers layers compute no K/V: each attends over the cache of the
    # last earlier layer of its kind (sliding or global), which holds the same positions.
    kv_shared_layers: int = 0
    # Gemma 4 (E2B, E4B): per-layer embeddings this wide per layer (0: none), models/gemma4.py.
    per_layer_input_size: int = 0
    # Each layer's MLP width where they differ (Gemma 4's double-wide shared layers); None: all
    # intermediate_size.
    layer_intermediate_sizes: tuple[int, ...] | None = None
    # Gemma 4: each layer's output times a learned scalar (files from converters that wrote none: 1,
    # as llama.cpp reads them).
    layer_scalars: bool = True
    # Hybrids: these layers are recurrent, their memory of a sequence a fixed-size state per
    # sequence (runner/recurrent_state.py), not a KV cache; the rest attend. Qwen3.5's are gated
    # delta nets (models/qwen35.py, linear_attention), LFM2's short convolutions of short_conv taps
    # (models/lfm2.py), Granite 4.0-H's Mamba-2 mixers (models/granite_hybrid.py, linear_attention).
    recurrent_layers: tuple[int, ...] = ()
    mlp_only_layers: tuple[int, ...] = ()  # Nemotron-H: layers of an MLP alone (no KV, no state)
    # Falcon-H1: attention and a recurrent mixer side by side in every layer (each layer keeps KV and a state)
    parallel_mixers: bool = False
    linear_attention: LinearAttentionShape | None = None
    short_conv: int = 0
    name: str = ""  # human-readable model name from the checkpoint

    def is_sliding(self, layer: int) -> bool:
        """Layer i is global when (i + 1) % pattern == 0; with no pattern every layer is global
        (and a Llama's window, if any, is in every layer)."""
        pattern = self.sliding_window_pattern
        return pattern is not None and (layer + 1) % pattern != 0

    def has_kv(self, layer: int) -> bool:
        """Whether the layer keeps K/V in the paged cache (a recurrent layer keeps a state instead)."""
        return self.parallel_mixers or (layer not in self.recurrent_layers and layer not in self.mlp_only_layers)

    def layer_kv_shape(self, layer: int) -> tuple[int, int]:
        """(KV heads, head width) of a layer's cache rows: Gemma 4's global layers differ."""
        if self.is_sliding(layer):
            return self.num_kv_heads, self.head_dim
        return self.global_kv_heads or self.num_kv_heads, self.global_head_dim or self.head_dim

    def kv_source(self, layer: int) -> int:
        """The layer whose cache `layer` attends over: itself, or for Gemma 4's shared layers
        the last layer before them of the same kind."""
        first_shared = self.num_layers - self.kv_shared_layers
        if layer < first_shared:
            return layer
        kind = self.is_sliding(layer)
        owners = [i for i in range(first_shared) if self.is_sliding(i) == kind]
        if not owners:
            raise ValueError(f"layer {layer} shares the KV of an earlier layer of its kind, and there is none")
        return owners[-1]

    def intermediate_size_of(self, layer: int) -> int:
        sizes = self.layer_intermediate_sizes
        return self.intermediate_size if sizes is None else sizes[layer]


@dataclass(frozen=True)
class DeviceConfig:
    """What the user asks of the device; runner/plan.py resolves every "auto" against the
    machine and the model file into an ExecutionPlan."""

    device: str = option("auto", "where the model runs; auto = CUDA when torch sees one, else the CPU",
                         choices=DEVICES)
    dtype: str = option("auto", "weights and activations; auto = bfloat16 where the CPU/GPU has native "
                        "support (float32 on textmill's kernels for a quantized GGUF)", choices=DTYPES)
    quantization: str = option(
        "auto", "weight-only int8/int4 linear layers (int4 keeps the LM head int8); auto = the GGUF file's "
        "own width on the float32 CPU kernels, none elsewhere; none = float weights", choices=QUANTIZATIONS)
    kv_cache_dtype: str = option(
        "auto", "the KV cache's element type; auto = float16 on the CPU kernels (half the memory of "
        "float32), the activation dtype elsewhere; int8 (CPU kernels only) = one code a value and a "
        "scale per head and token, about half of float16", choices=KV_DTYPES)
    kernels: bool = option(True, "run float32 on eager torch ops instead of textmill's C++ kernels "
                           "(the reference path)", flag="--no-kernels")
    threads: int | None = option(None, "torch threads (default: all cores)")
    enforce_eager: bool = option(False, "on CUDA, run decode steps op by op instead of replaying captured "
                                 "CUDA graphs")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: fixed-size blocks drawn from one pool."""

    block_size: int = option(16, "tokens per KV cache block")
    # None until wiring.py works out how many blocks `memory_gib` buys for the model.
    num_blocks: int | None = None
    enable_prefix_caching: bool = option(True, "do not reuse the KV blocks of a shared prompt prefix",
                                         flag="--no-prefix-caching")
    memory_gib: float = option(1.0, "memory for the paged KV cache, in GiB", flag="--kv-cache-memory",
                               metavar="GIB")
    # A hybrid's prefix cache: how many recurrent-state snapshots the runner keeps (0: none; wiring.py
    # sets it for a model with recurrent layers, engine/kv_cache/state_snapshots.py).
    state_snapshots: int = 0


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = option(64, "most requests in one running batch")
    # 256 rather than larger: arriving prompts get their first token sooner and running
    # streams stall for less, at the same throughput (docs/performance.md).
    max_num_batched_tokens: int = option(
        256, "token budget of one step; longer prompts are prefilled in chunks")
    # Prompt + generated tokens. None until wiring.py resolves it: the model's own window,
    # or the longest the KV cache holds.
    max_model_len: int | None = option(None, "context window (default: the model's, or what the KV cache "
                                       "memory holds)")
    # Prompt-lookup speculation (engine/ngram_draft.py): exact, and nearly free only while a
    # step is bound by reading the weights, i.e. with few rows; the scheduler times its decode
    # steps and takes the guesses that pay for their rows (engine/step_costs.py).
    draft_tokens: int = option(4, "tokens guessed from the request's own text and checked in one step, as "
                               "many as pay for their rows (0: off)", parse=count(0))
    draft_max_seqs: int = option(0, "guess tokens only while at most this many requests run (0: as many as "
                                 "the step's timing allows)", parse=count(0))


@dataclass(frozen=True)
class EngineConfig:
    """Everything that builds an engine: the model and how it runs. wiring.build_engine
    resolves it (the plan, the number of KV blocks, the context window)."""

    # cli.py: positional in `serve`, --model in `generate`.
    model: str | None = option(None, "a .gguf file or a Hugging Face folder (default: the bundled "
                               "SmolLM2-135M-Instruct)")
    device: DeviceConfig = field(default_factory=DeviceConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def updated(self, **changes: Any) -> EngineConfig:
        """A copy with fields changed by their own names, whichever group holds them:
        `config.updated(dtype="float32", max_model_len=2048)`."""
        groups = {name: getattr(self, name) for name in ("device", "cache", "scheduler")}
        # "device" is also DeviceConfig's own field (--device): a group is replaced only by a
        # group of its type; anything else goes to the group's field of that name.
        own = {k: changes.pop(k) for k in list(changes)
               if k in {f.name for f in fields(self)} and (k not in groups or isinstance(changes[k], type(groups[k])))}
        for name, group in groups.items():
            mine = {k: changes.pop(k) for k in list(changes) if k in {f.name for f in fields(group)}}
            groups[name] = replace(group, **mine)
        if changes:
            raise TypeError(f"EngineConfig has no fields {sorted(changes)}")
        return replace(self, **{**groups, **own})


@dataclass(frozen=True)
class ServerConfig:
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on")
    # None: the model's own name (a file's stem, a folder's name, the bundled model's name).
    served_model_name: str | None = option(None, "the model id clients send and /v1/models lists "
                                           "(default: the model file's or folder's name)")
    api_keys: tuple[str, ...] = option((), "required bearer key (repeatable; else TEXTMILL_API_KEY, "
                                       "comma-separated)", flag="--api-key", metavar="KEY",
                                       repeatable=True)
    log_level: str = option("info", "logging level")
    log_format: str = option("text", "json: one JSON object per log line (access lines carry their fields)",
                             choices=LOG_FORMATS)
    max_request_bytes: int = option(4 * 1024 * 1024, "larger request bodies get a 400")
    max_prompt_tokens: int | None = option(None, "longest prompt, in tokens (default: the context window)")
    max_prompts_per_request: int = option(256, "most prompts in one request")
    max_logit_bias_entries: int = option(1024, "most logit_bias entries in one request")
    max_n: int = option(128, "cap on n")
    max_best_of: int = option(20, "cap on best_of")
    # Bounded waiting: candidate sequences admitted but not yet running; past it a 429.
    max_queued_requests: int = option(256, "sequences that may wait for the engine; past it a 429 with "
                                      "Retry-After")
    shutdown_timeout: float = option(30.0, "on SIGTERM, time in-flight requests get to finish",
                                     metavar="SECONDS")
    # None: no limit, as in vLLM, since a long generation is legitimate and a client can set
    # its own timeout.
    request_timeout: float | None = option(
        None, "longest time one completion may take, from its arrival (queueing included) to its last "
        "token; past it the request is stopped, its KV cache freed, and the client gets a 504 "
        "timeout_error (a stream: an error event before [DONE]) (default: no limit)",
        metavar="SECONDS", parse=positive_seconds)
    # Open the port before the model is loaded (/health answers 503 meanwhile); the CLI
    # does, tests that want a ready server when the port opens don't.
    load_in_background: bool = False


@dataclass(frozen=True)
class ScaleConfig:
    """`textmill serve --replicas N`: more than one engine replica (or --ray-address, or
    autoscaling bounds) runs the server as a Ray Serve application (textmill/scale/)."""

    replicas: int = option(1, "engine replicas behind one endpoint; more than 1 runs on Ray Serve, on a "
                           "local Ray head unless --ray-address (needs the `ray` extra)")
    ray_address: str | None = option(None, "run on this Ray cluster (e.g. auto, or ray://head:10001) "
                                     "instead of a local head", metavar="ADDR")
    min_replicas: int | None = option(None, "autoscale between --min-replicas and --max-replicas on "
                                      "queued requests (default: fixed at --replicas)")
    max_replicas: int | None = option(None, "upper autoscaling bound (default: --replicas)")
    # Ray's request-based autoscaler: requests queued at the router plus those on a replica.
    target_queued_requests: float = option(8.0, "autoscaling target: requests queued or running per replica")

    def __post_init__(self):
        low = self.min_replicas if self.min_replicas is not None else 0
        high = self.max_replicas if self.max_replicas is not None else max(self.replicas, low, 1)
        if self.replicas < 1 or low < 0 or high < 1 or low > high:
            raise ValueError(f"replicas must be >= 1 and --min-replicas <= --max-replicas "
                             f"(got {self.replicas}, {self.min_replicas}, {self.max_replicas})")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def on_ray(self) -> bool:
        return self.replicas > 1 or self.ray_address is not None or self.autoscaling


@dataclass(frozen=True)
class GenerateConfig:
    """`textmill generate`: one prompt completed and printed, without a server."""

    prompt: str
    max_tokens: int = option(64, "tokens to generate")
    temperature: float = option(0.0, "sampling temperature; 0 is greedy")
    top_p: float = option(1.0, "nucleus sampling mass")
    seed: int = option(0, "sampling seed")
