"""runner/: owns the device. Batch building, the paged KV cache, attention, sampling, logprobs."""
from textmill.runner.batch import Batch, build_batch
from textmill.runner.kv_cache import AttentionGroup, AttentionMetadata, KVCache, PagedAttention
from textmill.runner.model_runner import ModelRunner
from textmill.runner.sampler import Sampler

__all__ = [
    "AttentionGroup",
    "AttentionMetadata",
    "Batch",
    "KVCache",
    "ModelRunner",
    "PagedAttention",
    "Sampler",
    "build_batch",
]
