"""Every flash_jax model as a plain numpy forward pass in float64: docs/model.md, for reading.

    from flash_jax.export import numpy_model
    model = numpy_model.load("runs/quickstart/export")   # model.safetensors + config.json
    logits_BTV = numpy_model.forward(model, tokens_BT)   # float64 [B, T, vocab]

`scripts/export.py` writes such a folder from a checkpoint; its docstring lists the parameter
names and shapes. This module needs numpy and the safetensors package (no JAX): it is the
model's math written to be read or ported, dense and unoptimised (FLASH's chunked attention is
written as masks over a [T, T] array). Tests hold it to the JAX models: tests/test_export.py
(whole models, every family) and tests/test_models.py (single layers).

Conventions, the same as the JAX models':
  * Dense layers compute y = x . kernel + bias, contracting x's last axes with the kernel's first
    ones: kernels are [in..., out...] (PyTorch's Linear weight is the transpose, [out, in]).
  * `segment_ids` [B, T] number the packed documents of a row (0 = padding) and `positions` are
    positions inside each document; without them a row is one document. Logits at padding
    positions carry no meaning.
  * A model family is one function in LAYERS: layer(p, x_BTD, segment_ids_BT, positions_BT, cfg)
    -> x_BTD, where p holds one layer's parameters under the file's names without the
    `layers.<i>.` prefix, and cfg is config.json as a dict.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_dtypes  # noqa: F401  (gives numpy a bfloat16, so that a bfloat16 export reads)
import numpy as np
import safetensors
import safetensors.numpy

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
NORM_EPS = 1e-5
ROPE_BASE = 10_000.0


@dataclasses.dataclass
class Model:
    config: dict  # config.json: the model config (name, num_layers, d_model, ...)
    params: dict[str, np.ndarray]  # float64, named as in model.safetensors


def load(directory: str) -> Model:
    """An exported model (`scripts/export.py`), its parameters in float64."""
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = json.load(f)
    path = os.path.join(directory, WEIGHTS_FILE)
    try:
        tensors = safetensors.numpy.load_file(path)
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors file ({e})") from e
    return Model(config, {name: t.astype(np.float64) for name, t in tensors.items()})


def forward(model: Model, tokens_BT, segment_ids_BT=None, positions_BT=None) -> np.ndarray:
    """Logits [B, T, vocab] (float64) of int tokens [B, T]."""
    cfg, p = model.config, model.params
    if cfg["name"] not in LAYERS:
        raise ValueError(f"no numpy forward pass for model {cfg['name']!r}; have {list(LAYERS)}")
    tokens = np.asarray(tokens_BT)
    segments = np.ones_like(tokens) if segment_ids_BT is None else np.asarray(segment_ids_BT)
    positions = document_positions(segments) if positions_BT is None else np.asarray(positions_BT)
    x = p["embed.table"][tokens]
    if cfg["name"] == "transformer":  # learned absolute positions
        x = x + p["position_embed"][positions]
    layer = LAYERS[cfg["name"]]
    for i in range(cfg["num_layers"]):
        x = layer(layer_params(p, i), x, segments, positions, cfg)
    x = norm(p, "final_norm.", x, cfg)
    head = p["embed.table"].T if cfg["tie_embeddings"] else p["head.kernel"]
    return x @ head


def layer_params(params: dict, i: int) -> dict:
    prefix = f"layers.{i}."
    return {name[len(prefix) :]: v for name, v in params.items() if name.startswith(prefix)}


# ----------------------------------------------------------------------------- building blocks


def dense(p, prefix, x):
    """x . kernel + bias over the kernel's input axes (those the bias does not have)."""
    kernel, bias = p[prefix + "kernel"], p[prefix + "bias"]
    return np.tensordot(x, kernel, axes=kernel.ndim - bias.ndim) + bias


def norm(p, prefix, x, cfg):
    """Scale norm, g * x / rms(x) with one scalar g; or layer norm (per-dimension scale, bias)."""
    if cfg["norm"] == "layer_norm":
        centred = x - x.mean(-1, keepdims=True)
        variance = np.mean(centred**2, -1, keepdims=True)
        return centred / np.sqrt(variance + NORM_EPS) * p[prefix + "scale"] + p[prefix + "bias"]
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + NORM_EPS) * p[prefix + "scale"]


def silu(x):
    return x / (1 + np.exp(-x))


def gelu(x):
    """The tanh approximation (jax.nn.gelu's default)."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def relu(x):
    return np.maximum(x, 0)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def rope(x, positions):
    """Rotates every pair (x_k, x_{k + w/2}) of the last axis (width w) by the angle
    position * 10000^(-2k / w), as a complex number; `positions` broadcast against x[..., 0]."""
    w = x.shape[-1]
    freq = ROPE_BASE ** (-np.arange(0, w, 2) / w)
    z = (x[..., : w // 2] + 1j * x[..., w // 2 :]) * np.exp(1j * positions[..., None] * freq)
    return np.concatenate([z.real, z.imag], axis=-1)


def document_positions(segment_ids_BT):
    """Each token's position inside its document (documents are contiguous runs of one id)."""
    T = segment_ids_BT.shape[1]
    index = np.arange(T)
    starts = np.ones_like(segment_ids_BT, dtype=bool)
    starts[:, 1:] = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    return index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)


def same_document(segment_ids_BT):
    """[B, T, T]: token j is in token i's document, and that is not padding."""
    seg = segment_ids_BT
    return (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)


def causal_mask(T, causal):
    """[T, T]: j <= i when causal (the diagonal is kept), else everything."""
    return np.tril(np.ones((T, T), bool)) if causal else np.ones((T, T), bool)


def relative_bias(p, query_index, key_index):
    """bias[i, j] of the quadratic attention, from the parameters the layer has:
    `rel_bias.weight`: a learned scalar per offset, w[i - j + span - 1] (Toeplitz);
    `rel_bias.a`, `rel_bias.b`: (R_i a) . (R_j b), R the RoPE rotation; neither: no bias."""
    if "rel_bias.weight" in p:
        w = p["rel_bias.weight"]
        span = (len(w) + 1) // 2
        return w[query_index[:, None] - key_index[None, :] + span - 1]
    if "rel_bias.a" in p:
        a = rope(p["rel_bias.a"][None], query_index)
        b = rope(p["rel_bias.b"][None], key_index)
        return a @ b.T
    return np.zeros((len(query_index), len(key_index)))


# ----------------------------------------------------------------------------- GAU, FLASH


def gated_projection(p, x, positions, cfg):
    """u, v [B, T, e] and the RoPE-rotated query/key heads [B, T, s] of a GAU layer:
    u, v, z = split(silu(dense(norm(x))), [e, e, s]); head h = z * gamma[h] + beta[h]."""
    e = cfg["expansion_dim"]
    uvz = silu(dense(p, "proj_in.", norm(p, "norm.", x, cfg)))
    u, v, z = uvz[..., :e], uvz[..., e : 2 * e], uvz[..., 2 * e :]
    gamma, beta = p["heads.gamma"], p["heads.beta"]
    heads = [rope(z * gamma[h] + beta[h], positions) for h in range(len(gamma))]
    return u, v, heads


def flash_quad_layer(p, x, segment_ids, positions, cfg):
    """GAU: out = x + dense(u * (A @ v)), A[i, j] = relu(q_i . k_j / n + bias(i, j))^2 where
    j is in i's document (and j <= i when causal), n = max_len (the fixed training length)."""
    u, v, (q, k) = gated_projection(p, x, positions, cfg)
    T = x.shape[1]
    index = np.arange(T)
    scores = q @ k.swapaxes(1, 2) / cfg["max_len"] + relative_bias(p, index, index)
    keep = same_document(segment_ids) & causal_mask(T, cfg["causal"])
    attended = np.where(keep, relu(scores) ** 2, 0.0) @ v
    return x + dense(p, "proj_out.", u * attended)


def flash_layer(p, x, segment_ids, positions, cfg):
    """FLASH: the GAU's attention replaced by mixed chunk attention over chunks of C tokens:
    quad_i = sum over j in i's chunk (and document, j <= i when causal) of
             relu(qq_i . kq_j / C + bias(i mod C, j mod C))^2 v_j
    lin_i  = (1 / |L(i)|) sum over j in L(i) of (ql_i . kl_j) v_j   (0 when L(i) is empty)
    L(i): i's document in chunks strictly before i's (causal), or the whole document (not)."""
    u, v, (quad_q, quad_k, lin_q, lin_k) = gated_projection(p, x, positions, cfg)
    T, C = x.shape[1], cfg["chunk_size"]
    index = np.arange(T)
    chunk = index // C
    document = same_document(segment_ids)

    scores = quad_q @ quad_k.swapaxes(1, 2) / C + relative_bias(p, index % C, index % C)
    in_chunk = chunk[:, None] == chunk[None, :]
    keep = document & in_chunk & causal_mask(T, cfg["causal"])
    quad = np.where(keep, relu(scores) ** 2, 0.0) @ v

    linear_set = document & (chunk[None, :] < chunk[:, None]) if cfg["causal"] else document
    count = linear_set.sum(-1, keepdims=True)
    lin = np.where(linear_set, lin_q @ lin_k.swapaxes(1, 2), 0.0) @ v / np.maximum(count, 1)
    return x + dense(p, "proj_out.", u * (quad + lin))


# ----------------------------------------------------------------------------- Transformers


def multi_head_attention(p, h, segment_ids, positions, cfg):
    """Attention per head over the same document (j <= i when causal); RoPE on queries and keys
    except in the vanilla Transformer. Kernels: query/key/value [d, H, k], out [H, k, d]. The
    weights are softmax attention's, or Performer's / Combiner's (`ATTENTION_WEIGHTS`)."""
    q, k, v = (dense(p, f"attention.{name}.", h) for name in ("query", "key", "value"))
    if cfg["name"] != "transformer":
        q, k = rope(q, positions[..., None]), rope(k, positions[..., None])
    weights = ATTENTION_WEIGHTS.get(cfg["name"], softmax_weights)(p, q, k, segment_ids, cfg)
    return dense(p, "attention.out.", np.einsum("bhij,bjhk->bihk", weights, v))


def softmax_weights(p, q, k, segment_ids, cfg):
    """[B, H, T, T] softmax(q . k / sqrt(k)) over the same segment id (padding attends to padding,
    so no row is empty) in causal order."""
    scores = np.einsum("bihk,bjhk->bhij", q, k) / np.sqrt(q.shape[-1])
    T = q.shape[1]
    keep = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal_mask(T, cfg["causal"])
    return softmax(np.where(keep[:, None], scores, -np.inf))


def performer_weights(p, q, k, segment_ids, cfg):
    """[B, H, T, T] FAVOR+ (Performer): phi(q_i) . phi(k_j), normalised over i's document (j <= i
    when causal), with phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(M), x' = x / k^(1/4) and the
    layer's fixed random features W = `attention.features` [M, k] (shared by the heads)."""
    W = p["attention.features"]

    def phi(x):
        x = x / x.shape[-1] ** 0.25
        return np.exp(x @ W.T - 0.5 * np.sum(x * x, -1, keepdims=True)) / np.sqrt(len(W))

    keep = same_document(segment_ids) & causal_mask(q.shape[1], cfg["causal"])
    kernel = np.einsum("bihm,bjhm->bhij", phi(q), phi(k)) * keep[:, None]
    total = kernel.sum(-1, keepdims=True)
    return kernel / np.where(total > 0, total, 1.0)  # padding rows: 0


def combiner_weights(p, q, k, segment_ids, cfg):
    """[B, H, T, T] Combiner-Fixed: spans of C = chunk_size positions. Query i (scaled by
    1 / sqrt(k)) takes a softmax over the tokens j of its document in its own span (j <= i when
    causal) and over one summary per other span r holding that document (earlier spans only
    when causal), the summary's logit q_i . max-pool of the keys of those tokens O_r; a
    summary's weight is shared among O_r by the softmax over O_r of (max-pool of their queries)
    . k_j. Every token of the document gets a weight."""
    B, T, H, _ = q.shape
    q = q / np.sqrt(q.shape[-1])
    span = np.arange(T) // cfg["chunk_size"]
    document = same_document(segment_ids)
    own_span = document & (span[:, None] == span[None, :]) & causal_mask(T, cfg["causal"])
    # Logits of the own span's tokens and of the summaries (column T + r), -inf where not read.
    logits = np.full((B, H, T, T + span[-1] + 1), -np.inf)
    logits[..., :T] = np.where(own_span[:, None], np.einsum("bihk,bjhk->bhij", q, k), -np.inf)
    summaries = []  # (b, readers, members, distribution over members [H, n])
    for b, r in np.ndindex(B, span[-1] + 1):
        for doc in set(segment_ids[b, span == r]) - {0}:
            members = (span == r) & (segment_ids[b] == doc)
            later = span > r if cfg["causal"] else span != r
            readers = np.flatnonzero(later & (segment_ids[b] == doc))
            key, query = k[b, members].max(0), q[b, members].max(0)  # [H, k]
            # Indexed with b, readers and T + r around a slice: the result is [readers, H].
            logits[b, :, readers, T + r] = np.einsum("ihk,hk->ih", q[b, readers], key)
            local = softmax(np.einsum("hk,jhk->hj", query, k[b, members]))
            summaries.append((b, r, readers, np.flatnonzero(members), local))
    row_max = np.max(logits, -1, keepdims=True)
    e = np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0))
    total = e.sum(-1, keepdims=True)
    groups = e / np.where(total > 0, total, 1.0)  # padding rows: 0
    weights = groups[..., :T].copy()
    for b, r, readers, members, local in summaries:
        share = groups[b, :, readers, T + r]  # [readers, H], as above
        weights[b][np.ix_(range(H), readers, members)] += share.T[:, :, None] * local[:, None]
    return weights


ATTENTION_WEIGHTS = {"performer": performer_weights, "combiner": combiner_weights}


def feed_forward(p, h, cfg):
    """GELU MLP, or SwiGLU (silu(h . wg) * (h . wi)) in Transformer++, Performer and Combiner."""
    if cfg["name"] in ("transformer_pp", "performer", "combiner"):
        hidden = silu(dense(p, "mlp.wg.", h)) * dense(p, "mlp.wi.", h)
    else:
        hidden = gelu(dense(p, "mlp.wi.", h))
    return dense(p, "mlp.wo.", hidden)


def transformer_block(p, x, segment_ids, positions, cfg):
    """Pre-norm: x + attention(norm(x)), then + feed_forward(norm(x))."""
    x = x + multi_head_attention(p, norm(p, "attention_norm.", x, cfg), segment_ids, positions, cfg)
    return x + feed_forward(p, norm(p, "mlp_norm.", x, cfg), cfg)


LAYERS = {
    "flash": flash_layer,
    "flash_quad": flash_quad_layer,
    "transformer": transformer_block,
    "transformer_plus": transformer_block,
    "transformer_pp": transformer_block,
    "performer": transformer_block,
    "combiner": transformer_block,
}
