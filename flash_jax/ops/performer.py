"""FAVOR+ attention (Performer: Choromanski et al., "Rethinking Attention with Performers",
ICLR 2021): softmax attention approximated with positive orthogonal random features, in time and
memory linear in T.

    softmax kernel  exp(q . k / sqrt(D)) = E_w[phi(q) . phi(k)],  w ~ N(0, I_D)
    phi(x)          = exp(W x' - |x'|^2 / 2) / sqrt(M),  x' = x / D^(1/4),  W = [w_1 .. w_M]
    out_i           = sum_{j in L(i)} phi(q_i).phi(k_j) v_j  /  sum_{j in L(i)} phi(q_i).phi(k_j)

L(i): the tokens j <= i (causal) or all tokens (bidirectional) of i's document (same non-zero
segment id; padding gets output 0). The rows of W are orthogonal in blocks of D and have the
lengths of independent Gaussian vectors (the paper's ORF: every row is marginally N(0, I), so the
estimate stays unbiased, and orthogonality lowers its variance): `orthogonal_random_features`.

Computation (no token-level loop, no `[T, T]` array): chunks of C tokens; inside a chunk a masked
`[C, C]` block phi(q) phi(k)^T; across chunks the sums of phi(k) [v, 1]^T over the document's
tokens in other chunks, passed by FLASH's own state passing (flash_jax.ops.state_passing: one masked
`[G, G]` matmul per direction, no scan). The column of ones carries the normaliser sum phi(k) in
the same matmuls as the values.

Numerical stability, exact in real arithmetic (no approximation beyond FAVOR+'s own):
- queries: a per-query constant (the max over features of the log-features) is subtracted before
  exp; it cancels between numerator and denominator.
- keys: a per-key constant would not cancel, and one taken over other tokens (the global max of
  the public code) would break causality, document isolation and incremental decoding. Key
  log-features w_f . x - |x|^2 / 2 are bounded by |w_f|^2 / 2; a per-feature shift
  s_f = max(|w_f|^2 / 2 - KEY_LOG_BOUND, 0), moved to the query side (where it cancels like the
  rest), keeps every key feature below exp(KEY_LOG_BOUND) without touching typical keys (their
  log-features are about -|x|^2 / 2, a few units below 0). Keys of huge norm (|x|^2 / 2 beyond
  about 87 plus their best w_f . x) underflow to 0.
- the division: numerator and denominator are divided by the (stop-gradient) denominator first,
  so the quotient's gradient never squares the denominator (which spans many orders of
  magnitude with the norms of q and k: its square under- or overflows float32). A document
  whose every key underflowed gets output 0, never NaN.
Features, sums and the division are float32 whatever the compute dtype; the result is cast back
to v's dtype.

Shapes: B batch, T tokens, H heads, D head width, M random features, G chunks, C chunk size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flash_jax.ops import attention, multihead, state_passing

_F32 = jnp.float32
# Key features stay below exp(50) ~ 5e21: sums of up to 6e16 of them (tokens x features) fit in
# float32 (3.4e38).
KEY_LOG_BOUND = 50.0


def orthogonal_random_features(key: jax.Array, num_features: int, width: int) -> jax.Array:
    """W `[M, D]` float32: blocks of D orthogonal rows (the Q of a Gaussian matrix's QR, signs
    fixed so that Q is uniformly distributed), each row rescaled to the length of an independent
    N(0, I_D) vector. The last block is cut to M rows."""
    num_blocks = -(-num_features // width)
    block_key, norm_key = jax.random.split(key)
    gaussian_NDD = jax.random.normal(block_key, (num_blocks, width, width), _F32)
    q_NDD, r_NDD = jnp.linalg.qr(gaussian_NDD)
    signs_ND = jnp.sign(jnp.diagonal(r_NDD, axis1=-2, axis2=-1))
    rows_MD = (q_NDD * signs_ND[:, None, :]).transpose(0, 2, 1).reshape(-1, width)[:num_features]
    lengths_M = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, width), _F32), axis=-1)
    return rows_MD * lengths_M[:, None]


def favor_features(x, projection_MD, *, query: bool) -> jax.Array:
    """Positive random features `[..., M]` (float32) of queries or keys `[..., D]`, stabilised as
    the module docstring says. For any query q and key k,

        favor_features(q, W, query=True) . favor_features(k, W, query=False)
            = c(q) * phi(q) . phi(k)

    with c(q) > 0 depending on q alone, so normalised attention is exactly the paper's.
    """
    D = x.shape[-1]
    x = jnp.asarray(x).astype(_F32) * D**-0.25
    w_MD = jnp.asarray(projection_MD).astype(_F32)
    wx = jnp.einsum("...d,md->...m", x, w_MD)
    shift_M = jnp.maximum(0.5 * jnp.sum(jnp.square(w_MD), axis=-1) - KEY_LOG_BOUND, 0.0)
    if query:  # exp(w.x + s - max): the |x|^2/2 and 1/sqrt(M) factors cancel with c(q)
        logits = wx + shift_M
        logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    else:  # exp(w.x - |x|^2/2 - s) <= exp(|w|^2/2 - s) <= exp(KEY_LOG_BOUND)
        logits = wx - shift_M - 0.5 * jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return jnp.exp(logits)


def favor_attention(
    q, k, v, projection, *, causal: bool, chunk_size: int, segment_ids=None, boundary=None
):
    """Normalised FAVOR+ attention (module docstring), one projection shared by the heads.

    Args:
      q, k, v: `[B, T, H, D]` (RoPE, if any, already applied to q and k).
      projection: W `[M, D]`, e.g. from `orthogonal_random_features`.
      causal: j <= i (the diagonal kept) or the whole document.
      chunk_size: C, the block of the within-chunk part (a cost choice: the result does not
        depend on it beyond float rounding).
      segment_ids: int `[B, T]`, contiguous runs of equal ids, 0 = padding; None = one document.
      boundary: None, or what the tokens beyond the ends of this stretch of the sequence add
        (context parallelism, flash_jax/ops/context_parallel.py): a `state_passing.Boundary` whose
        `sum_BDSE` holds, per direction and head, sum phi(k) [v, 1]^T `[B, D, H, M, D + 1]`
        over the document continuing across that end (its counts are unused).

    Returns:
      `[B, T, H, D]` in v's dtype; padding rows are exactly 0.
    """
    q, k, v, seg_BT = multihead.check_inputs(q, k, v, segment_ids)
    B, T, H, D = q.shape
    if projection.ndim != 2 or projection.shape[1] != D:
        raise ValueError(f"projection must be [M, D = {D}], got shape {projection.shape}")
    phi_q = favor_features(q, projection, query=True)
    phi_k = favor_features(k, projection, query=False)
    v1 = values_with_ones(v)
    C = int(chunk_size)
    seg_BGC = multihead.chunked(seg_BT, C)
    links = state_passing.chunk_links(seg_BGC, causal, boundary)  # shared by the heads
    if boundary is None:
        sums_BDHME = jnp.zeros((B, 1 if causal else 2, H, 1, 1), _F32)  # no edge: added nowhere
    else:
        sums_BDHME = boundary.sum_BDSE

    def one_head(phi_q_BTM, phi_k_BTM, v1_BTE, edge_sums_BDME):
        edge_sums_BDME = None if boundary is None else edge_sums_BDME
        return _kernel_sums(phi_q_BTM, phi_k_BTM, v1_BTE, seg_BGC, links, causal, edge_sums_BDME)

    out = multihead.per_head(one_head, phi_q, phi_k, v1, sums_BDHME)
    return _normalise(out).astype(v.dtype)


def values_with_ones(v_XD):
    """[v, 1] float32 `[..., D + 1]`: one more value column of ones, whose output is the
    normaliser sum_j phi(q_i) . phi(k_j)."""
    return jnp.concatenate([v_XD.astype(_F32), jnp.ones(v_XD.shape[:-1] + (1,), _F32)], axis=-1)


def key_value_sums(phi_k_BTHM, v_BTHD):
    """sum over the tokens of phi(k) [v, 1]^T, `[B, H, M, D + 1]` float32: what a stretch of
    one document adds to the state its later tokens read (`decode_step`'s, context
    parallelism's edge sums, whole-document scoring's carried state)."""
    return jnp.einsum("bthm,bthe->bhme", phi_k_BTHM, values_with_ones(v_BTHD))


def _normalise(out_XE):
    """[numerator, denominator] (the value columns and the ones column) -> their quotient, with
    both divided by the stop-gradient denominator first (the module docstring). Padding (and
    only fully underflowed documents) have numerator and denominator 0: the output is 0."""
    numerator, denominator = out_XE[..., :-1], out_XE[..., -1:]
    safe = jnp.where(denominator > 0, denominator, 1.0)
    scale = jax.lax.stop_gradient(safe)
    return (numerator / scale) / (safe / scale)


def _kernel_sums(phi_q_BTM, phi_k_BTM, v_BTE, seg_BGC, links, causal, edge_sums_BDME=None):
    """sum_{j in L(i)} (phi_q_i . phi_k_j) v_j for one head, float32 `[B, T, E]`.

    Within chunk(i): a masked `[C, C]` kernel block. The other chunks: FLASH's linear-state
    passing, reused from flash_jax.ops.state_passing (one home for the packed-document rule):
    `links` (`chunk_links`) say which tokens each chunk sums and which state each token reads,
    `pass_states` sums the per-chunk sums phi(k) v^T over the linked chunks with one masked
    `[G, G]` matmul per direction (no scan), `per_direction` picks each query's state. Its
    L(i) outside chunk(i) is exactly Performer's: i's document in earlier chunks (and, when
    bidirectional, later ones). `chunk_states` itself does not fit: it divides the states by
    FLASH's token counts and rounds them to the compute dtype, while Performer's normaliser is
    the column of ones in v and every sum stays float32. `edge_sums_BDME`: the sums from beyond
    the stretch's ends, added to the states of the chunks `links.edge_BGD` marks.
    """
    B, T, _ = phi_q_BTM.shape
    G, C = seg_BGC.shape[1:]
    q_BGCM, k_BGCM, v_BGCE = (multihead.chunked(x, C) for x in (phi_q_BTM, phi_k_BTM, v_BTE))
    mask_BGCC = attention._quadratic_mask(seg_BGC, causal)  # same document, j <= i if causal
    block_BGCC = jnp.where(mask_BGCC, jnp.einsum("bgim,bgjm->bgij", q_BGCM, k_BGCM), 0.0)
    out_BGCE = jnp.einsum("bgij,bgje->bgie", block_BGCC, v_BGCE)

    # X = (directions) x M: the sums passed forward, and backward when bidirectional.
    k_BGCX = state_passing.per_direction(k_BGCM, links.member_BGCD)
    sums_BGXE = jnp.einsum("bgcx,bgce->bgxe", k_BGCX, v_BGCE)
    passed_BGXE = state_passing.pass_states(links.link_BDGH, sums_BGXE, _F32)
    if edge_sums_BDME is not None:
        edge_BGDME = links.edge_BGD[..., None, None] * edge_sums_BDME[:, None]
        passed_BGXE = passed_BGXE + edge_BGDME.reshape(passed_BGXE.shape)
    q_BGCX = state_passing.per_direction(q_BGCM, links.use_BGCD)
    out_BGCE = out_BGCE + jnp.einsum("bgcx,bgxe->bgce", q_BGCX, passed_BGXE)
    return out_BGCE.reshape(B, G * C, -1)[:, :T]


def decode_step(phi_q_BHM, phi_k_BHM, v_BHD, state_BHME):
    """One causal token: adds phi(k) [v, 1]^T to the running state `[B, H, M, D + 1]` (float32,
    constant size), then reads it with phi(q). Returns (output `[B, H, D]` float32, state)."""
    state_BHME = state_BHME + jnp.einsum("bhm,bhe->bhme", phi_k_BHM, values_with_ones(v_BHD))
    return _normalise(jnp.einsum("bhm,bhme->bhe", phi_q_BHM, state_BHME)), state_BHME
