"""Architecture names -> model classes.

Checkpoints name their family in two ways: GGUF's `general.architecture` ("llama") and a
Hugging Face config's `architectures` ("LlamaForCausalLM"). Both resolve to one registry key,
which is what ModelConfig.architecture holds.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from torch import nn

from textmill.config import ModelConfig
from textmill.models.falcon_h1 import FalconH1ForCausalLM
from textmill.models.gemma3 import Gemma3ForCausalLM
from textmill.models.gemma4 import Gemma4ForCausalLM
from textmill.models.gpt2 import GPT2LMHeadModel
from textmill.models.granite_hybrid import GraniteHybridForCausalLM
from textmill.models.lfm2 import Lfm2ForCausalLM
from textmill.models.llama import LlamaForCausalLM
from textmill.models.nemotron_h import NemotronHForCausalLM
from textmill.models.glm4 import Glm4ForCausalLM
from textmill.models.olmo2 import Olmo2ForCausalLM
from textmill.models.qwen2 import Qwen2ForCausalLM
from textmill.models.qwen3 import Qwen3ForCausalLM
from textmill.models.qwen35 import Qwen35ForCausalLM

# registry key -> model class
MODEL_CLASSES: Mapping[str, type[nn.Module]] = MappingProxyType({
    "llama": LlamaForCausalLM,
    "phi3": LlamaForCausalLM,  # Llama's network; the loaders split its fused tensors
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "olmo2": Olmo2ForCausalLM,
    "glm4": Glm4ForCausalLM,
    "gemma": Gemma3ForCausalLM,  # Gemma 1: the same network without the output norms (post_norms)
    "gemma2": Gemma3ForCausalLM,  # the same network: models/gemma3.py
    "gemma3": Gemma3ForCausalLM,
    "gemma4": Gemma4ForCausalLM,
    "qwen35": Qwen35ForCausalLM,
    "lfm2": Lfm2ForCausalLM,
    "granitehybrid": GraniteHybridForCausalLM,
    "nemotron_h": NemotronHForCausalLM,
    "falcon_h1": FalconH1ForCausalLM,
    "gpt2": GPT2LMHeadModel,
})

# every accepted spelling (GGUF and HF) -> registry key
ARCHITECTURE_ALIASES: Mapping[str, str] = MappingProxyType({
    "llama": "llama",
    "LlamaForCausalLM": "llama",
    # Mistral is Llama with an optional sliding window; GGUF files call it "llama" too.
    "mistral": "llama",
    "MistralForCausalLM": "llama",
    # SmolLM3 is Llama without RoPE in every 4th layer (ModelConfig.no_rope_layers).
    "smollm3": "llama",
    "SmolLM3ForCausalLM": "llama",
    # Granite (3.x, dense) is Llama with four multipliers (ModelConfig.residual_multiplier, ...).
    "granite": "llama",
    "GraniteForCausalLM": "llama",
    # Granite 3.x MoE: Granite with experts; GGUF files only (its folders fuse each layer's experts
    # into one input_linear of its own layout).
    "granitemoe": "llama",
    "granitemoeshared": "llama",
    # ERNIE 4.5 (dense) is Llama whose RoPE pairs dims (2i, 2i + 1), as ggml's does: from a GGUF
    # its q/k rows are put in Llama's order as llama.cpp's permuted ones are. Its folders keep
    # that order, which the folder loader does not undo: GGUF files only.
    "ernie4_5": "llama",
    # InternLM2/2.5 is Llama once llama.cpp's converter has split its grouped wqkv into q, k
    # and v (permuted as Llama's). GGUF files only: its folders fuse them its own way.
    "internlm2": "llama",
    # EXAONE 3.0/3.5 is Llama (transformers maps its config to LlamaForCausalLM); llama.cpp's
    # converter leaves its q/k rows unpermuted (ggml turns them rotate-half). GGUF files only:
    # its folders name the weights their own way.
    "exaone": "llama",
    # Ministral 3 (the text model of Mistral3ForConditionalGeneration) is Llama with YaRN
    # (rope_freq_factors, rope_attention_factor) and a query temperature that is 1 within its
    # original context, where its window is capped (loader/rope_scaling.py).
    "mistral3": "llama",
    "Ministral3ForCausalLM": "llama",
    # OLMoE is Llama with experts (ModelConfig.num_experts) and q and k normed over all heads;
    # Mixtral's GGUF files are "llama" files with experts.
    "olmoe": "llama",
    "OlmoeForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    # ERNIE 4.5 MoE (21B-A3B): the dense ERNIE 4.5's block (GGUF files only, as it) with experts
    # chosen by a biased softmax, a shared expert, a leading dense layer.
    "ernie4_5-moe": "llama",
    # gpt-oss: Llama's block with biases, attention sinks, every other layer windowed, and
    # experts with a clamped SwiGLU (ModelConfig's switches). GGUF files only.
    "gpt-oss": "llama",
    "phi3": "phi3",
    "Phi3ForCausalLM": "phi3",
    "qwen2": "qwen2",
    "Qwen2ForCausalLM": "qwen2",
    # Qwen1.5-MoE and Qwen2 MoE: Qwen2 with experts and a gated shared expert.
    "qwen2moe": "qwen2",
    "Qwen2MoeForCausalLM": "qwen2",
    "qwen3": "qwen3",
    "Qwen3ForCausalLM": "qwen3",
    # Qwen3 MoE (30B-A3B, 235B-A22B, Coder): Qwen3 with experts; Qwen3-VL MoE files' text the same.
    "qwen3moe": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3",
    "qwen3vlmoe": "qwen3",
    # The text models of Qwen2-VL/2.5-VL and Qwen3-VL files (their vision towers live in
    # separate mmproj files): M-RoPE turns every section by the same position for text,
    # which is plain RoPE, and Qwen3-VL's deepstack adds nothing there. GGUF files only: a
    # folder holds the vision-language model whole.
    "qwen2vl": "qwen2",
    "qwen3vl": "qwen3",
    "olmo2": "olmo2",
    "Olmo2ForCausalLM": "olmo2",
    # GLM-4 (9B and 32B -0414, GLM-Z1; models/glm4.py): four norms a layer, half of each head turned.
    # GGUF files only.
    "glm4": "glm4",
    # OLMo 3: OLMo 2 with a window in three of every four layers (plain RoPE there, the scaled
    # in the rest); llama.cpp's converter writes its files as "olmo2".
    "Olmo3ForCausalLM": "olmo2",
    # EXAONE 4.0 is OLMo 2's block with Qwen3's per-head QK norm (ModelConfig.qk_norm_whole False).
    "exaone4": "olmo2",
    "Exaone4ForCausalLM": "olmo2",
    "gemma": "gemma",
    "GemmaForCausalLM": "gemma",
    "gemma2": "gemma2",
    "Gemma2ForCausalLM": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "Gemma3ForCausalLM": "gemma3",
    # Gemma 4 (dense text: E2B, E4B, 31B; models/gemma4.py), GGUF files only: its folders hold the
    # vision and audio model whole.
    "gemma4": "gemma4",
    # Qwen3.5 (dense text; models/qwen35.py): gated delta nets in three layers of four, GGUF files
    # only (its folders hold the vision model too). Qwen3.5 MoE (35B-A3B and up): the same layers with
    # experts and a gated shared expert.
    "qwen35": "qwen35",
    "qwen35moe": "qwen35",
    "qwen3next": "qwen35",  # Qwen3-Next (80B-A3B): the same, its delta nets' heads grouped
    # LFM2 (350M to 2.6B; models/lfm2.py): short convolutions in most layers, Llama's attention with
    # q/k norms in the rest. GGUF files only. LFM2 MoE (8B-A1B, 24B-A2B): experts after its first
    # layers, chosen by a biased sigmoid.
    "lfm2": "lfm2",
    "lfm2moe": "lfm2",
    # Granite 4.0-H (350M to 32B-A9B; models/granite_hybrid.py): Mamba-2 layers beside NoPE attention,
    # a SwiGLU MLP or experts with a shared one, Granite's multipliers. GGUF files only.
    "granitehybrid": "granitehybrid",
    # Nemotron-H (Nemotron Nano 9B/12B v2; models/nemotron_h.py): a Mamba-2 mixer, NoPE attention or a
    # ReLU^2 MLP in each layer. GGUF files only. Nemotron 3 Nano (nemotron_h_moe): ReLU^2 experts there.
    "nemotron_h": "nemotron_h",
    "nemotron_h_moe": "nemotron_h",
    # Falcon-H1 (0.5B to 34B, Falcon-H1R; models/falcon_h1.py): attention and a Mamba-2 mixer side by side
    # in every layer, its muP multipliers in the weights. GGUF files only.
    "falcon-h1": "falcon_h1",
    "falcon_h1": "falcon_h1",
    "gpt2": "gpt2",
    "GPT2LMHeadModel": "gpt2",
})


def resolve_architecture(name: str) -> str:
    """The registry key for a GGUF or HF architecture name; ValueError for unknown ones."""
    key = ARCHITECTURE_ALIASES.get(name)
    if key is None:
        supported = ", ".join(sorted(ARCHITECTURE_ALIASES))
        raise ValueError(f"unsupported model architecture {name!r} (supported: {supported})")
    return key


def model_class(name: str) -> type[nn.Module]:
    return MODEL_CLASSES[resolve_architecture(name)]


def build_model(config: ModelConfig) -> nn.Module:
    """An uninitialized model of the config's family (build under torch.device('meta')
    and load weights with assign=True to skip random initialization)."""
    return model_class(config.architecture)(config)
