"""Analytic FLOP counts of a training step, and the devices' peak FLOP/s, for model FLOPs
utilisation (MFU) and benchmarks.

XLA's cost analysis counts the body of a `scan` once, and the layers are one scanned body, so
it undercounts the model by about num_layers; these closed forms count what the model computes.
"""

from __future__ import annotations

import math


def analytic_flops(model_config, context: int, tokens: int, num_params: int) -> dict:
    """Training FLOPs of one step (forward + backward = 3 x forward; remat recompute not counted,
    as usual for model FLOPs utilisation).

    dense:     6 * N * tokens, N = parameters that multiply activations (all but the input
               embedding table(s); norm scales and biases are counted too, a negligible excess)
    attention, per layer and token (forward; x 3 for training), with T the context, d the width,
    e the expansion width, s the shared key width, C the chunk size:
      Transformer(+/++):  4 * T * d              q.k over T keys and a.v, full T x T computed
      FLASH-Quad:         2 * T * (s + e)        relu^2 scores (s) and a.v (e), full T x T
      FLASH (causal):     2 * C' * (s + e)       in-chunk scores and a.v, C' = C * ceil(T/C) * C / T
                        + 4 * s * e              chunk sums k^T v and the query read-out q.S
      FLASH (bidirect.):  2 * C' * (2s + e) + 6 * s * e   (own chunk's linear block, both carries)
      Performer (causal): 4 * M * d x 2/3            random features of q and k (M per head);
                                                     W is not trained, so the backward only
                                                     needs the input gradient (2x, not 3x)
                        + 2 * C' * (H M + d + H)     in-chunk phi(q) phi(k)^T and its product
                                                     with [v, 1] (H heads of width d / H)
                        + 4 * M * (d + H)            chunk sums phi(k)^T [v, 1] and the read-out
      Performer (bidir.): the same with 8 * M * (d + H) (sums and read-outs in both directions)
      Combiner:           4 * d * (C' + n * (G + 1))  direct logits and weights over the own
                                                     span, logits and weights over G = ceil(T/C)
                                                     span summaries, and the summaries' own
                                                     softmax over their span; n = 1 (causal) or
                                                     2 (bidirectional: head and tail summaries)
    The full T x T products are counted although the causal half is masked: the XLA
    implementations compute them.
    position bias (GAU models whose relative bias has the RoPE form, i.e. spans over 512 tokens):
    bias = (R a)(R b)^T is one [span, span] x s matmul per layer and step, shared by the batch:
    3 * L * 2 * span^2 * s, span = T (FLASH-Quad) or C (FLASH). The Toeplitz form is a gather.
    """
    cfg = model_config
    T, d, e, s, L = context, cfg.d_model, cfg.expansion_dim, cfg.qk_dim, cfg.num_layers
    embedding = cfg.vocab_size * d if not cfg.tie_embeddings else 0
    if cfg.name == "transformer":
        embedding += cfg.max_len * d  # learned absolute positions: a lookup
    n_matmul = num_params - embedding
    C = cfg.chunk_size
    padded_over_t = math.ceil(T / C) * C / T  # padding of the last chunk is computed too
    if cfg.name == "performer":
        H, M = cfg.num_heads, cfg.random_features
        attention_fwd = 4 * M * d * 2 / 3 + 2 * C * padded_over_t * (H * M + d + H)
        attention_fwd += (4 if cfg.causal else 8) * M * (d + H)
    elif cfg.name == "combiner":
        sides = 1 if cfg.causal else 2
        attention_fwd = 4 * d * (C * padded_over_t + sides * (math.ceil(T / C) + 1))
    elif cfg.is_transformer:
        attention_fwd = 4 * T * d
    elif cfg.name == "flash_quad":
        attention_fwd = 2 * T * (s + e)
    elif cfg.causal:  # FLASH
        attention_fwd = 2 * C * padded_over_t * (s + e) + 4 * s * e
    else:
        attention_fwd = 2 * C * padded_over_t * (2 * s + e) + 6 * s * e
    position_bias = 0
    if not cfg.is_transformer and cfg.rel_pos_kind == "rope":
        span = T if cfg.name == "flash_quad" else cfg.chunk_size
        position_bias = 3 * L * 2 * span**2 * s
    dense = 6 * n_matmul * tokens
    attention = 3 * L * attention_fwd * tokens
    return {
        "dense": float(dense),
        "attention": float(attention),
        "position_bias": float(position_bias),
        "total": float(dense + attention + position_bias),
    }


# Dense bf16 peak FLOP/s per chip, matched against `jax.devices()[0].device_kind` (lowercased;
# first match wins, so the more specific names come first). Vendor data sheets; the H100 and H200
# figures are the SXM parts (the PCIe H100 peaks near 756 TFLOP/s).
PEAK_FLOPS = (
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports itself as "TPU v5"
    ("tpu v4", 275e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for name, peak in PEAK_FLOPS:
        if name in kind:
            return peak
    return None
