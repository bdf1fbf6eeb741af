"""Context parallelism: one sequence cut into consecutive stretches over the devices of a mesh
axis, for FLASH's mixed chunk attention and for document positions.

Each device holds whole chunks of the sequence and runs the attention op on them alone; what it
needs from the other devices is, per direction, the linear part's sum and count over the tokens
of the document that continues across its ends (`state_passing.Boundary`). Documents are
contiguous runs of ids, so that is the other devices' edge runs (the tokens of their last
document, and of their first when bidirectional) chained through devices that hold a single
document: one all-gather of one `[S, E]` float32 sum, a count and two ids per device and
direction, the same bytes at any context length. The backward sends the sums' cotangents back
the same way (the all-gather's transpose).

These functions run inside `jax.shard_map` over `axis_name` (`sharding.per_shard`); each sees
its own stretch `[B, T / n, ...]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flash_jax.ops import attention, multihead, performer, state_passing

_F32 = jnp.float32


def mixed_chunk_attention_sharded(
    quad_q, quad_k, lin_q, lin_k, v, segment_ids, quad_bias, *, axis_name, chunk_size, causal
):
    """`attention.mixed_chunk_attention` on this device's stretch of a sequence sharded over
    `axis_name`: equal to the op on the whole sequence, sliced (tested). The stretch must hold
    whole chunks (T / n a multiple of `chunk_size`), as the config checks."""
    T = v.shape[1]
    if T % chunk_size:
        raise ValueError(
            f"each device's stretch of the sequence ({T} tokens) must hold whole chunks of "
            f"{chunk_size}"
        )
    boundary = _boundary(lin_k, v, segment_ids, axis_name, causal)
    return attention.mixed_chunk_attention(
        quad_q,
        quad_k,
        lin_q,
        lin_k,
        v,
        chunk_size=chunk_size,
        causal=causal,
        segment_ids=segment_ids,
        quad_bias=quad_bias,
        boundary=boundary,
    )


def favor_attention_sharded(q, k, v, projection, segment_ids, *, axis_name, causal, chunk_size):
    """`performer.favor_attention` on this device's stretch of a sequence sharded over
    `axis_name`: each device gathers the others' per-head sums phi(k) [v, 1]^T over their edge
    runs, `[H, M, D + 1]` per device and direction, whatever the context."""
    q, k, v, seg_BT = multihead.check_inputs(q, k, v, segment_ids)
    phi_k = performer.favor_features(k, projection, query=False)

    def edge_sums(member_BT):
        phi_k_BTHM = jnp.where(member_BT[:, :, None, None], phi_k, 0.0)
        return (performer.key_value_sums(phi_k_BTHM, v),)

    seg_BD, (sums_BDHME,) = edge_states(edge_sums, seg_BT, axis_name, causal)
    boundary = state_passing.Boundary(seg_BD, sums_BDHME, jnp.zeros(seg_BD.shape, _F32))
    return performer.favor_attention(
        q,
        k,
        v,
        projection,
        causal=causal,
        chunk_size=chunk_size,
        segment_ids=seg_BT,
        boundary=boundary,
    )


def document_positions_sharded(segment_ids_BT, *, axis_name):
    """`layers.document_positions` of this device's stretch: positions inside each document,
    counting the document's tokens on earlier devices (one all-gather of three ints per row and
    device, not of the ids)."""
    from flash_jax.layers.positions import document_positions  # layers import ops, not back

    local_BT = document_positions(segment_ids_BT)
    first_B, last_B = segment_ids_BT[:, 0], segment_ids_BT[:, -1]
    tail_B = jnp.sum(segment_ids_BT == last_B[:, None], axis=1, dtype=jnp.int32)
    before_B, seg_before_B = _chained(
        (tail_B,), first_B, last_B, last_B, axis_name, step=1, require_nonzero=False
    )
    # The first run of the stretch (local position = index) may continue the document before it.
    in_first_run_BT = local_BT == jnp.arange(segment_ids_BT.shape[1])[None, :]
    continues_BT = in_first_run_BT & (first_B == seg_before_B)[:, None]
    return local_BT + jnp.where(continues_BT, before_B[:, None], 0)


def _boundary(lin_k_BTS, v_BTE, seg_BT, axis_name, causal) -> state_passing.Boundary:
    """FLASH's `Boundary` of this device's stretch: per direction, the id of the document that
    continues across that end and its tokens' linear-attention sum and count on the other
    devices."""

    def edge_sums(member_BT):
        sum_BSE = jnp.einsum(
            "bts,bte->bse",
            jnp.where(member_BT[..., None], lin_k_BTS, 0),
            v_BTE,
            preferred_element_type=_F32,
        )
        return sum_BSE, jnp.sum(member_BT, axis=1, dtype=_F32)

    seg_BD, (sum_BDSE, count_BD) = edge_states(edge_sums, seg_BT, axis_name, causal)
    return state_passing.Boundary(seg_BD, sum_BDSE, count_BD)


def edge_states(edge_sums, seg_BT, axis_name, causal):
    """What the other devices contribute across this stretch's ends, for any state that is a sum
    over a document's tokens: `edge_sums(member_BT)` gives a device's sums (a tuple of arrays
    with leading B) over the tokens `member_BT`; per direction (1 causal, 2 bidirectional), the
    other devices' edge-run sums that reach this stretch are added up. Returns (the ids of the
    documents continuing across the ends `[B, D]`, the sums stacked on axis 1)."""
    first_B, last_B = seg_BT[:, 0], seg_BT[:, -1]
    ends = [(last_B, 1)] + ([] if causal else [(first_B, -1)])
    segs, sums = [], []
    for end_B, step in ends:
        # This stretch's own edge run: its tokens of the document at that end.
        member_BT = (seg_BT == end_B[:, None]) & (seg_BT != 0)
        own = edge_sums(member_BT)
        *chained, seg_B = _chained(own, first_B, last_B, end_B, axis_name, step, True)
        segs.append(seg_B)
        sums.append(chained)
    stacked = tuple(jnp.stack(parts, axis=1) for parts in zip(*sums, strict=True))
    return jnp.stack(segs, axis=1), stacked


def _chained(values, first_B, last_B, end_B, axis_name, step, require_nonzero):
    """Sums over the other devices of `values` (per device, of its edge run at the `end_B`
    side), keeping those whose document reaches this stretch: with step 1 the devices before
    this one whose `end_B` id is that of the token before this stretch, when every device in
    between holds only that document; with step -1 the mirror (the devices after, the token
    after). Returns (*sums, that id, 0 where there is none). `require_nonzero`: padding (id 0)
    passes nothing (the positions count padding runs like documents)."""
    n = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    gathered = [jax.lax.all_gather(x, axis_name) for x in (*values, first_B, last_B, end_B)]
    *all_values, firsts_NB, lasts_NB, ends_NB = gathered
    k_N = jnp.arange(n)
    neighbour = me - step  # the device holding the token next to this stretch on that side
    valid = (neighbour >= 0) & (neighbour < n)
    near_ids_NB = lasts_NB if step == 1 else firsts_NB
    seg_B = jnp.where(valid, near_ids_NB[jnp.clip(neighbour, 0, n - 1)], 0)
    # Devices wholly inside that document pass it through; the chain stops at the first that is
    # not, which itself still counts (its edge run).
    whole_NB = (firsts_NB == seg_B[None]) & (lasts_NB == seg_B[None])
    if step == 1:
        between_KJ = (k_N[None, :] > k_N[:, None]) & (k_N[None, :] < me)
        side_N = k_N < me
    else:
        between_KJ = (k_N[None, :] < k_N[:, None]) & (k_N[None, :] > me)
        side_N = k_N > me
    through_KB = jnp.all(~between_KJ[:, :, None] | whole_NB[None, :, :], axis=1)
    take_NB = side_N[:, None] & through_KB & (ends_NB == seg_B[None])
    if require_nonzero:
        take_NB = take_NB & (seg_B[None] != 0)
    sums = []
    for x_NB in all_values:
        take = take_NB.reshape(take_NB.shape + (1,) * (x_NB.ndim - 2))
        sums.append(jnp.sum(jnp.where(take, x_NB, 0), axis=0))
    return (*sums, seg_B)
