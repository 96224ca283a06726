"""Random block bytes of each GGML type the synthetic files use (bench/synthetic_gguf.py): random
codes, with scales chosen so that each weight matrix has a standard deviation of about
1/sqrt(fan-in) and mean ~0, so activations stay O(1) through the layers."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

Q4_K, Q6_K, Q8_0, F32 = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q8_0,
                         GGMLQuantizationType.F32)
MXFP4, Q5_0 = GGMLQuantizationType.MXFP4, GGMLQuantizationType.Q5_0
QK_K = 256  # values per k-quant super-block

def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """(nb,) float -> (nb, 2) uint8, little-endian f16."""
    return values.astype("<f2").reshape(-1, 1).view(np.uint8)


def pack_q4k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(nb, 8) 6-bit scales and mins -> (nb, 12) bytes, ggml's get_scale_min_k4 layout."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    return out


def q4k_blocks(rng: np.random.Generator, nb: int, std: float) -> np.ndarray:
    """nb random Q4_K blocks: w = d*sc*q - dmin*m, q uniform in 0..15, m set so w has mean ~0."""
    blocks = rng.integers(0, 256, (nb, 144), dtype=np.uint8)  # the 4-bit codes stay random
    sc = rng.integers(8, 64, (nb, 8), dtype=np.uint8)
    m = np.clip(np.rint(sc * 7.5 / 8), 0, 63).astype(np.uint8)  # dmin = 8 d: dmin*m ~ d*sc*7.5
    d = np.full(nb, std / (np.sqrt(np.mean(sc.astype(np.float64) ** 2)) * 4.61))  # std(q) = 4.61
    blocks[:, 0:2] = _f16_bytes(d)
    blocks[:, 2:4] = _f16_bytes(8 * d)
    blocks[:, 4:16] = pack_q4k_scales(sc, m)
    return blocks


def q6k_blocks(rng: np.random.Generator, nb: int, std: float) -> np.ndarray:
    """nb random Q6_K blocks: w = d*sc*(q - 32), q uniform in 0..63, int8 scales 4..16."""
    blocks = rng.integers(0, 256, (nb, 210), dtype=np.uint8)  # ql, qh: random codes
    sc = rng.integers(4, 17, (nb, 16), dtype=np.int8)
    blocks[:, 192:208] = sc.view(np.uint8)
    d = np.full(nb, std / (np.sqrt(np.mean(sc.astype(np.float64) ** 2)) * 18.47))  # std(q-32)
    blocks[:, 208:210] = _f16_bytes(d)
    return blocks


def tensor_bytes(rng: np.random.Generator, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> np.ndarray:
    """The stored array: float32 ones for norms, a random float32 router (its logits differ
    from token to token, so tokens spread over the experts as a trained router's do), (rows,
    bytes per row) uint8 for k-quants (an expert stack: (experts, rows, bytes per row))."""
    if qtype == F32 and len(shape) == 2:
        return (rng.standard_normal(shape) / np.sqrt(shape[1]) * 4).astype(np.float32)
    if qtype == F32:
        return np.ones(shape, np.float32)
    if len(shape) == 3:
        return tensor_bytes(rng, (shape[0] * shape[1], shape[2]), qtype).reshape(shape[0], shape[1], -1)
    rows, cols = shape
    std = 1.0 / np.sqrt(cols)  # activations keep their scale from layer to layer
    if qtype in (Q8_0, MXFP4, Q5_0):
        make = {Q8_0: q8_0_blocks, MXFP4: mxfp4_blocks, Q5_0: q5_0_blocks}[qtype]
        return make(rng, rows * cols // 32, std).reshape(rows, -1)
    if cols % QK_K:
        raise ValueError(f"k-quant rows need a multiple of {QK_K} values, got {cols}")
    nb = rows * cols // QK_K
    blocks = q4k_blocks(rng, nb, std) if qtype == Q4_K else q6k_blocks(rng, nb, std)
    return blocks.reshape(rows, -1)


def q8_0_blocks(rng: np.random.Generator, nb: int, std: float) -> np.ndarray:
    """nb random Q8_0 blocks: w = d*q, q uniform in -127..127 (std 73.3)."""
    blocks = np.empty((nb, 34), np.uint8)
    blocks[:, 0:2] = _f16_bytes(np.full(nb, std / 73.3))
    blocks[:, 2:] = rng.integers(-127, 128, (nb, 32), dtype=np.int8).view(np.uint8)
    return blocks


def q5_0_blocks(rng: np.random.Generator, nb: int, std: float) -> np.ndarray:
    """nb random Q5_0 blocks (llama.cpp's fallback for Q4_K where a row is no whole number of 256 values):
    w = d*(q - 16), q's 5 bits random (std of q - 16: 9.23)."""
    blocks = np.empty((nb, 22), np.uint8)
    blocks[:, 0:2] = _f16_bytes(np.full(nb, std / 9.23))
    blocks[:, 2:] = rng.integers(0, 256, (nb, 20), dtype=np.uint8)
    return blocks


def mxfp4_blocks(rng: np.random.Generator, nb: int, std: float) -> np.ndarray:
    """nb random MXFP4 blocks: w = 2^(e - 128) * T[q] with T the doubled e2m1 values (std 5.85
    over uniform codes), e one power of two for the whole tensor."""
    blocks = rng.integers(0, 256, (nb, 17), dtype=np.uint8)  # the 4-bit codes stay random
    blocks[:, 0] = int(np.rint(128 + np.log2(std / 5.85)))
    return blocks


def router_and_decay(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
    """The float tensors the hybrids' writers draw alike (None for the rest): a router whose logits
    differ from token to token, a small selection bias, decays that forget at different rates
    (A = -exp(A_log) of 1 to 16, as the reference initializes it)."""
    if name.endswith("ffn_gate_inp.weight"):
        return tensor_bytes(rng, shape, F32)
    if name.endswith("exp_probs_b.bias"):
        return (0.01 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(".ssm_a"):
        return -rng.uniform(1.0, 16.0, shape).astype(np.float32)
    return None
