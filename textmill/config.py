"""Configuration: frozen dataclasses, built once in cli.py and passed down.

Nothing here reads the environment or a file; cli.py (or a test) decides every value.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer, independent of the checkpoint format.

    The loader fills it from GGUF metadata or a Hugging Face config.json. Fields that a
    family does not use keep their defaults.
    """

    architecture: str  # registry key: "llama", "qwen2", "gemma3", "gpt2"
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
    rope_local_theta: float | None = None  # gemma3: sliding layers use their own base
    rope_scaling_factor: float | None = None  # linear position scaling where the config sets it
    # Per-frequency divisors of the RoPE inverse frequencies, (head_dim / 2,): Llama 3.1+
    # "llama3" scaling (HF rope_scaling, or GGUF's rope_freqs tensor).
    rope_freq_factors: tuple[float, ...] | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # qwen2: bias on q/k/v
    sliding_window: int | None = None
    # gemma3: layer i is global when (i + 1) % pattern == 0; None means all layers global.
    sliding_window_pattern: int | None = None
    query_pre_attn_scalar: float | None = None  # gemma3: attention scale is this ** -0.5
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    hidden_act: str = "silu"  # "silu" (SwiGLU), "gelu_tanh" (GeGLU), "gelu" (gpt2 MLP)
    name: str = ""  # human-readable model name from the checkpoint


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: fixed-size blocks drawn from one pool."""

    block_size: int = 16
    num_blocks: int = 2048
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # running requests per step
    max_num_batched_tokens: int = 256  # token budget per step; long prefills are chunked to it
    max_model_len: int = 8192  # context window: prompt + generated tokens


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "float32"  # "float32" or "bfloat16" (resolved, never "auto")
    num_threads: int | None = None  # torch intra-op threads; None means the number of cores


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = "SmolLM2-135M-Instruct"
    api_keys: tuple[str, ...] = ()
    max_request_bytes: int = 4 * 1024 * 1024  # larger bodies get a 400 before they are parsed
    max_prompts_per_request: int = 256
    max_prompt_tokens: int | None = None  # None: the model's context window is the only bound
    max_logit_bias_entries: int = 1024
    max_n: int = 128
    max_best_of: int = 20
    # Bounded waiting: candidate sequences admitted but not yet running; past it a 429.
    max_queued_requests: int = 256
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    # Seconds one completion may take from its arrival, queueing included; past it the
    # request is aborted (its KV blocks freed) and answered with a 504. None: no limit, as
    # in vLLM, since a long generation is legitimate and a client can set its own timeout.
    request_timeout: float | None = None
    log_format: str = "text"  # "text" or "json"
    # Open the port before the model is loaded (/health answers 503 meanwhile); the CLI
    # does, tests that want a ready server when the port opens don't.
    load_in_background: bool = False
