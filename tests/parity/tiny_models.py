"""Tiny random-weight checkpoints of every family, made with transformers at test time.

Each is a Hugging Face folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) that transformers itself wrote from `AutoModelForCausalLM
.from_config`, so the folder layout, names and config keys are the real ones. Weights get
seeded noise on top of transformers' init (norm weights included, so a norm loaded with the
wrong offset shows), and a wide enough spread that greedy decoding has clear winners.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
FIM = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
VOCAB_SIZE = 320
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
MAX_POSITIONS = 256
SLIDING_WINDOW = 8  # shorter than every test prompt
GEMMA2_SOFTCAPS = (1.5, 4.0)  # attention scores, final logits (real Gemma 2: 50, 30)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "def add(a, b):\n    return a + b\n\ndef mul(a, b):\n    return a * b\n",
    "Once upon a time there was a small model that learned to write text.",
    "for i in range(10):\n    print(i, i * i)\n",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
]
PROMPTS = {
    "prose": "The quick brown fox jumps over the lazy dog, and then the model",
    "code": "def add(a, b):\n    return a + b\n\nfor i in range(3):\n    print(",
    "mixed": "Paris 1234 + 5678 = ? ünïcödé and tabs\t\tand\n\nnewlines",
}


def train_tokenizer(specials: tuple[str, ...] = (EOS,)) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) with VOCAB_SIZE entries, trained on CORPUS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


# YaRN with an original context of 128: its query temperature (Ministral 3) stays 1 over
# every prompt and greedy continuation here.
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
             "beta_fast": 32.0, "beta_slow": 1.0}


def hf_config(family: str):
    """A tiny transformers config of the family, with the features worth checking switched on."""
    import transformers as tf

    common = dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=FFN,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-6, eos_token_id=0,
                  bos_token_id=None, pad_token_id=None)
    if family == "llama":
        return tf.LlamaConfig(**common, head_dim=24, tie_word_embeddings=False,
                              rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    if family == "llama3":  # Llama 3.1+ RoPE scaling; a short original context so all 3 bands occur
        return tf.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False)
    if family == "phi3":  # fused qkv_proj and gate_up_proj, a sliding window in every layer
        return tf.Phi3Config(**common, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":  # head_dim is not hidden / heads, as in every real Qwen3
        return tf.Qwen3Config(**common, head_dim=24, tie_word_embeddings=True,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if family == "qwen3_yarn":  # Qwen3's long-context setting; a short original context puts the ramp inside a head
        return tf.Qwen3Config(**common, head_dim=24, tie_word_embeddings=True, rope_parameters=YARN_ROPE)
    if family == "ministral3":  # Llama with YaRN, cos/sin scaled by a ratio of mscales, a query temperature
        return tf.Ministral3Config(**common, head_dim=16, tie_word_embeddings=False, rope_parameters=YARN_ROPE | {
            "mscale": 1.0, "mscale_all_dim": 0.5, "llama_4_scaling_beta": 0.1})
    if family == "glm4":  # four norms a layer, q/k/v biases, RoPE on half of each head (pairs 2i, 2i + 1)
        return tf.Glm4Config(**common, head_dim=24, attention_bias=True, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.5})
    if family == "olmo2":  # norms on the attention's and MLP's outputs, q and k normed over all heads
        return tf.Olmo2Config(**common, tie_word_embeddings=False,
                              rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    if family == "internlm2":  # InternLM2 as llama.cpp's converter leaves it: a Llama (q/k permuted)
        return tf.LlamaConfig(**common, tie_word_embeddings=False,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if family == "exaone":  # EXAONE 3.x: transformers' Llama under its own config (its GGUF rows unpermuted)
        return tf.ExaoneConfig(**common, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)
    if family == "olmo3":  # OLMo 2 with a window in one layer of two (plain RoPE), YaRN in the other
        return tf.Olmo3Config(**common, tie_word_embeddings=False, sliding_window=SLIDING_WINDOW,
                              layer_types=["sliding_attention", "full_attention"],
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                               "full_attention": YARN_ROPE})
    if family == "exaone4":  # OLMo 2's block with each head's q and k normed alone, Llama 3.1's RoPE scaling
        return tf.Exaone4Config(**common, head_dim=16, tie_word_embeddings=True, sliding_window=None,
                                layer_types=["full_attention"] * LAYERS, rope_parameters=LLAMA3_ROPE)
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            **common, head_dim=16, query_pre_attn_scalar=24, sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "rope_theta": 100000.0,
                                                "factor": 2.0}},
            # transformers' Gemma 3 ignores attn_logit_softcapping (real configs leave it
            # null), so only the final soft-cap is compared.
            final_logit_softcapping=30.0, attn_logit_softcapping=None, tie_word_embeddings=False)
    if family == "gemma2":  # soft-caps small enough to bend these tiny models' scores and logits
        return tf.Gemma2Config(
            **common, head_dim=16, query_pre_attn_scalar=24, sliding_window=SLIDING_WINDOW,
            attn_logit_softcapping=GEMMA2_SOFTCAPS[0], final_logit_softcapping=GEMMA2_SOFTCAPS[1],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    if family == "smollm3":  # Llama without RoPE in every 4th layer (NoPE): four layers, the last NoPE
        return tf.SmolLM3Config(**(common | dict(num_hidden_layers=4)), tie_word_embeddings=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    if family == "granite":  # Llama with four multipliers, none neutral (real 3.x: 12, 0.22, 1/64, 8)
        return tf.GraniteConfig(**common, tie_word_embeddings=True, embedding_multiplier=2.5,
                                residual_multiplier=0.5, attention_multiplier=0.4, logits_scaling=0.7,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "gemma":  # Gemma 1: GeGLU, (1 + w) norms, no output norms, windows or soft-caps;
        # its head untied here: tied, this tiny model's greedy decoding repeats one token
        return tf.GemmaConfig(**common, head_dim=16, tie_word_embeddings=False, hidden_activation="gelu_pytorch_tanh",
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "ernie4_5":  # Llama with RoPE on pairs (2i, 2i + 1)
        return tf.Ernie4_5Config(**common, head_dim=16, tie_word_embeddings=True, use_bias=False,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "qwen3moe":  # 8 experts of 32, two a token, one dense layer of two
        return tf.Qwen3MoeConfig(**common, head_dim=24, tie_word_embeddings=True, num_experts=8,
                                 num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                                 mlp_only_layers=[1], rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if family == "olmoe":  # Llama with experts (weights not renormalized), q and k normed over all heads
        return tf.OlmoeConfig(**(common | dict(intermediate_size=32)), tie_word_embeddings=False, num_experts=8,
                              num_experts_per_tok=3, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "mixtral":  # Llama with experts under its own names (block_sparse_moe, w1/w2/w3)
        return tf.MixtralConfig(**(common | dict(intermediate_size=32)), tie_word_embeddings=False,
                                num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "qwen2moe":  # q/k/v biases, experts not renormalized, a gated shared expert
        return tf.Qwen2MoeConfig(**common, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if family == "granitemoe":  # Granite's four multipliers with experts (GGUF files only)
        return tf.GraniteMoeConfig(**(common | dict(intermediate_size=32)), tie_word_embeddings=False,
                                   num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.5,
                                   residual_multiplier=0.5, attention_multiplier=0.4, logits_scaling=0.7,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "ernie4_5_moe":  # ERNIE 4.5's block; 8 experts of 32, 2 a token by a biased softmax, 2 shared
        return tf.Ernie4_5_MoeConfig(**common, head_dim=16, tie_word_embeddings=True, use_bias=False,
                                     moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=2,
                                     moe_layer_start_index=1, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 10000.0})
    if family == "gpt_oss":  # biases everywhere, attention sinks, a window every other layer, 4 experts of 32
        return tf.GptOssConfig(**(common | dict(intermediate_size=32)), head_dim=16, tie_word_embeddings=False,
                               num_local_experts=4, num_experts_per_tok=2, sliding_window=SLIDING_WINDOW,
                               rope_parameters=YARN_ROPE | {"truncate": True})  # llama.cpp's YaRN truncates
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                             n_positions=MAX_POSITIONS, activation_function="gelu_new",
                             eos_token_id=0, bos_token_id=0)
    raise ValueError(family)


FAMILIES = ("llama", "llama3", "mistral", "phi3", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2", "smollm3", "granite",
            "gemma", "ministral3", "qwen3_yarn", "olmo2", "exaone4", "olmo3")


def tiny_hf_model(family: str, seed: int = 0, **config_changes):
    """A random transformers model of the family, float32, eval mode; `config_changes` are
    set on its config first."""
    import transformers as tf

    torch.manual_seed(seed)
    config = hf_config(family)
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    return model.eval().requires_grad_(False)


def random_model(config, seed: int):
    """The config's transformers model, float32, eval mode: norm weights 1 + N(0, 0.2), every other
    weight N(0, 0.15) on top of its init (so a tensor read the wrong way round is far off)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.add_(torch.randn_like(p) * 0.15)
    return model.eval().requires_grad_(False)


def save_folder(model, tokenizer: Tokenizer, folder: Path, *, max_shard_size: str | None = None
                ) -> Path:
    """save_pretrained plus the tokenizer files a server needs."""
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": EOS, "bos_token": None, "add_bos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": MAX_POSITIONS,
    }))
    return folder


def prompt_ids(tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    ids = {name: torch.tensor(tokenizer.encode(text).ids) for name, text in PROMPTS.items()}
    assert all(len(t) > SLIDING_WINDOW + 4 for t in ids.values())
    return ids


def phi3_longrope_model(original: int = 8, partial_rotary_factor: float = 1.0):
    """A tiny Phi-3 with LongRoPE (Phi-3.5, Phi-3's 128k models): per-frequency divisors for
    windows up to the original context and others past it, and cos/sin scaled by
    sqrt(1 + ln(256 / 8) / ln(8)); with partial_rotary_factor < 1, Phi-4-mini's RoPE on only
    the first part of each head."""
    import transformers as tf

    half = int(HIDDEN // HEADS * partial_rotary_factor) // 2
    gen = torch.Generator().manual_seed(5)
    short = (1.0 + torch.rand(half, generator=gen)).tolist()
    long = (1.0 + 6.0 * torch.rand(half, generator=gen)).tolist()
    config = tiny_hf_model("phi3").config
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
                              "long_factor": long, "original_max_position_embeddings": original,
                              "partial_rotary_factor": partial_rotary_factor}
    config.original_max_position_embeddings = original
    config.sliding_window = None
    torch.manual_seed(4)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    return model.eval().requires_grad_(False)


def tiny_vl_model(family: str, seed: int = 0):
    """A tiny Qwen2.5-VL ("qwen2vl") or Qwen3-VL ("qwen3vl") of transformers, vision tower
    included, for text-only use: its M-RoPE turns every section by the same position there."""
    import transformers as tf

    text = dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POSITIONS,
                rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=0, bos_token_id=None, pad_token_id=None)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN)
    if family == "qwen3vl":  # head_dim 24: 12 angles in interleaved sections of 4
        text |= dict(head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                   "mrope_section": [4, 4, 4], "mrope_interleaved": True})
        config = tf.Qwen3VLConfig(text_config=text, vision_config=vision | dict(deepstack_visual_indexes=[0]),
                                  tie_word_embeddings=True)
        model_class = tf.Qwen3VLForConditionalGeneration
    elif family == "qwen2vl":  # head_dim 16: 8 angles in sections of 2, 3 and 3
        text |= dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
        model_class = tf.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = model_class._from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    return model.eval().requires_grad_(False)
