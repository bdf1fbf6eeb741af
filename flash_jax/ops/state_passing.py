"""FLASH's state passing across chunks: which chunks and tokens exchange linear-attention sums
when documents are packed, and the states they pass.

The one home of the packed-document rule (`chunk_links`) that FLASH's XLA path (attention.py), its
GPU kernel (pallas_gpu.py), Performer and Combiner share, and of `Boundary`, what context
parallelism (context_parallel.py) passes across the ends of a device's stretch of the sequence.
The precision policy is the one in attention.py's docstring; `dot` is its matmul.

Shapes: B batch, G (and H) chunks, C chunk size, S key width, E value width, D directions of the
states (1 causal, 2 bidirectional), X = D * S.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_F32 = jnp.float32


class Boundary(NamedTuple):
    """What the tokens beyond the ends of a stretch of the sequence contribute to its linear part,
    per direction d (0: the tokens before the stretch, 1: those after it, bidirectional only):
    the id of the document that continues across that end (0: none), and the float32 sum of
    kl_j v_j^T and the count over its tokens out there. Documents are contiguous, so these are
    all that crosses: one `[S, E]` sum per end, however long the sequence."""

    seg_BD: jax.Array  # int ids
    sum_BDSE: jax.Array  # float32
    count_BD: jax.Array  # float32


def check_boundary(boundary: Boundary, B: int, S: int, E: int, causal: bool) -> Boundary:
    """`boundary` with its shapes checked against B, S, E and the directions, as arrays (its
    sums and counts in float32)."""
    D = 1 if causal else 2
    expected = {"seg_BD": (B, D), "sum_BDSE": (B, D, S, E), "count_BD": (B, D)}
    for name, shape in expected.items():
        got = jnp.shape(getattr(boundary, name))
        if got != shape:
            raise ValueError(f"boundary.{name} must have shape {shape}, got {got}")
    return Boundary(
        jnp.asarray(boundary.seg_BD),
        jnp.asarray(boundary.sum_BDSE, _F32),
        jnp.asarray(boundary.count_BD, _F32),
    )


class ChunkLinks(NamedTuple):
    """Which tokens and chunks exchange linear-attention sums; see `chunk_links`.

    Direction d = 0 passes sums forward (to later chunks); d = 1, bidirectional only, backward.
    """

    member_BGCD: jax.Array  # bool: token c of chunk h is in its chunk's sum A[h, d]
    use_BGCD: jax.Array  # bool: token c of chunk g reads the state passed to chunk g
    link_BDGH: jax.Array  # bool: chunk g receives A[h, d]
    link_BDHG: jax.Array  # the same, transposed (compared as such: see `dot`)
    norm_BGC: jax.Array  # float32 1 / max(N_i, 1) of every token, N_i = |L(i)|
    norm_BGD: jax.Array  # float32: that of the tokens with use_BGCD (1 where none)
    edge_BGD: jax.Array | None  # bool: chunk g receives the `Boundary` sum of direction d


def chunk_links(seg_BGC, causal: bool, boundary: Boundary | None = None) -> ChunkLinks:
    """The cross-chunk structure of `attention.mixed_chunk_attention`, from the chunked ids alone.

    Direction 0 (both modes): chunk h sums `A[h] = sum kl v^T` over its tokens of the document of
    its last token (`member`), and token c of chunk g reads

        P[g] = sum_h link[g, h] A[h],   link[g, h] = [h < g] [run[h] == run[g - 1]]

    when its document is that of token gC - 1 (`use`), divided by its count N (counts pass like
    the sums). run[g] numbers the maximal runs of chunks whose last tokens share an id, so the
    document of token gC - 1 reaches back through exactly the chunks of run[g - 1]. This is the
    carry `P[g] = [same document continues] P[g - 1] + A[g]` unrolled: one masked `[G, G]` matmul
    (`pass_states`) replaces any scan over chunks, and it is token-exact for packed documents
    under the contiguity precondition (the tokens of a document before chunk g are those of the
    document of token gC - 1 when the ids match). Direction 1 (bidirectional) mirrors it: the
    chunks' first tokens, h > g, run[g + 1], token (g + 1)C. Padding (id 0) is in no sum and
    reads nothing.

    A `Boundary` is a virtual chunk beyond each end (before chunk 0 for d = 0, after chunk G - 1
    for d = 1) whose end token has the boundary's id: chunk g receives its sum when g is the
    first chunk past that end or the chunks in between form one run with that id (`edge`).

    Built from `[B, G, C]` ids and `[B, G, G]` comparisons only: no scan, no `[B, T, E]` work.
    With `chunk_states` (the sums and the `[G, G]` matmul) and `per_direction` (which queries
    read which state), it is what a kernel that passes states "as the XLA path does" reuses.
    """
    B, G, _ = seg_BGC.shape
    valid_BGC = seg_BGC != 0
    h_1H, g_G1 = jnp.arange(G)[None, :], jnp.arange(G)[:, None]
    ends = [(seg_BGC[:, :, -1], 1)] + ([] if causal else [(seg_BGC[:, :, 0], -1)])
    members, uses, links, links_t, counts, edges = [], [], [], [], [], []
    for d, (seg_end_BG, step) in enumerate(ends):
        seg_edge_B1 = 0 if boundary is None else boundary.seg_BD[:, d : d + 1]
        changes_BG = jnp.concatenate(
            [jnp.ones((B, 1), bool), seg_end_BG[:, 1:] != seg_end_BG[:, :-1]], axis=1
        )
        run_BG = jnp.sum(changes_BG[:, None, :] & (h_1H <= g_G1), axis=-1)  # a cumsum, no scan
        # The neighbour that sums come from: chunk g - 1 (forward) or g + 1 (backward); -1 and 0
        # past the ends match no run and no token.
        run_from_BG = _shift_chunks(run_BG, step, fill=-1)
        seg_from_BG = _shift_chunks(seg_end_BG, step, fill=seg_edge_B1)
        member_BGC = (seg_BGC == seg_end_BG[:, :, None]) & valid_BGC
        link_BGH = (h_1H < g_G1 if step == 1 else h_1H > g_G1) & (
            run_BG[:, None, :] == run_from_BG[:, :, None]
        )
        link_BHG = (g_G1 < h_1H if step == 1 else g_G1 > h_1H) & (
            run_BG[:, :, None] == run_from_BG[:, None, :]
        )
        members.append(member_BGC)
        uses.append((seg_BGC == seg_from_BG[:, :, None]) & valid_BGC)
        links.append(link_BGH)
        links_t.append(link_BHG)
        count_BH = jnp.sum(member_BGC, axis=-1, dtype=_F32)
        count_BG = jnp.sum(jnp.where(link_BGH, count_BH[:, None, :], 0.0), axis=-1)
        if boundary is not None:
            first = 0 if step == 1 else G - 1  # the chunk next to the boundary's end
            edge_BG = (g_G1[:, 0] == first) | (
                (run_from_BG == run_BG[:, first : first + 1])
                & (seg_end_BG[:, first : first + 1] == seg_edge_B1)
            )
            edges.append(edge_BG)
            count_BG = count_BG + jnp.where(edge_BG, boundary.count_BD[:, d : d + 1], 0.0)
        counts.append(count_BG)
    use_BGCD = jnp.stack(uses, axis=-1)
    count_BGC = jnp.sum(jnp.where(use_BGCD, jnp.stack(counts, -1)[:, :, None, :], 0.0), axis=-1)
    if not causal:  # L(i) also holds the own chunk's tokens of the document
        count_BGC = count_BGC + jnp.sum(same_segment(seg_BGC), axis=-1, dtype=_F32)
    norm_BGC = 1.0 / jnp.maximum(count_BGC, 1.0)  # N_i = 0 -> the sum is 0 -> lin 0, no 0/0
    # N_i depends on i only through its id, so the tokens that read one state share one N.
    norm_BGD = jnp.max(jnp.where(use_BGCD, norm_BGC[..., None], 0.0), axis=2)
    return ChunkLinks(
        member_BGCD=jnp.stack(members, axis=-1),
        use_BGCD=use_BGCD,
        link_BDGH=jnp.stack(links, axis=1),
        link_BDHG=jnp.stack(links_t, axis=1),
        norm_BGC=norm_BGC,
        norm_BGD=jnp.where(norm_BGD > 0, norm_BGD, 1.0),
        edge_BGD=jnp.stack(edges, axis=-1) if edges else None,
    )


def chunk_states(links: ChunkLinks, kl_BGCS, v_BGCE, boundary: Boundary | None = None):
    """The states the chunks read, `[B, G, X, E]` in the compute dtype (v's): per direction d
    (rows d * S ... (d + 1) * S - 1 of X), the passed sums of the float32 per-chunk sums
    `A[h, d] = sum_{c: member[h, c, d]} kl_c v_c^T` (`pass_states`), divided by the count N of
    the tokens that read them. Token c of chunk g then gets its cross-chunk linear part as
    `per_direction(ql, use)[g, c] . states[g]`: one matmul."""
    dtype = v_BGCE.dtype
    kl_BGXC = per_direction_transposed(kl_BGCS, links.member_BGCD)
    sums_BGXE = dot("bgxc,bgce->bgxe", kl_BGXC, v_BGCE, dtype)
    passed_BGXE = pass_states(links.link_BDGH, sums_BGXE, dtype)
    if boundary is not None:  # float32, added before the one rounding of the passed state
        edge_BGD11 = links.edge_BGD[..., None, None].astype(_F32)
        edge_sums_BGDSE = edge_BGD11 * boundary.sum_BDSE[:, None]
        passed_BGXE = passed_BGXE + edge_sums_BGDSE.reshape(passed_BGXE.shape)
    return (passed_BGXE * per_state_row(links.norm_BGD, passed_BGXE.shape[2])).astype(dtype)


def pass_states(link_BDGH, x_BGXE, dtype):
    """y[g, d] = sum_h link[d, g, h] x[h, d] for each direction d (rows of X): one `[G, G]`
    matmul batched over the directions, operands in `dtype` (0/1 links are exact in any dtype),
    float32 accumulation. With the transposed links (`link_BDHG`) it is its own backward.

    The layout is XLA:TPU's concern: no split and concatenation of X (the bidirectional op moved
    211 KiB per token instead of 162 on v5e), and the result direction-major, moved into place
    afterwards (in X's order XLA:TPU copied it to a G-minor layout at 32K: 178 KiB per token
    bidirectional on v5e, 109 causal on v4, against 162 and 93)."""
    B, D, G, _ = link_BDGH.shape
    x_BGDSE = x_BGXE.reshape(B, G, D, -1, x_BGXE.shape[-1])
    y_BDGSE = dot("bdgh,bhdse->bdgse", link_BDGH, x_BGDSE, dtype)
    return jnp.moveaxis(y_BDGSE, 1, 2).reshape(x_BGXE.shape)


def per_direction(x_BGCS, mask_BGCD):
    """[B, G, C, S] -> [B, G, C, X]: x masked by each direction's mask, side by side along X."""
    x_BGCDS = jnp.where(mask_BGCD[..., None], x_BGCS[:, :, :, None, :], 0)
    return x_BGCDS.reshape(x_BGCS.shape[:3] + (-1,))


def per_direction_transposed(x_BGCS, mask_BGCD):
    """`per_direction`'s result with its last two axes swapped, `[B, G, X, C]`, written to
    memory as such: the left operand of a sum over a chunk's tokens (x^T y) with the summed axis
    minor, the one form in which XLA's CPU backend runs a bf16 matmul in bf16. Given x
    transposed, it runs the matmul in float32 on converted copies of both operands (v or dO: 12
    KiB per token each at E = 2048; the causal op moved 208.6 KiB per token instead of 166.6).

    The barrier keeps XLA from folding the transpose back into the matmul (the CPU backend then
    fails at run time: DEVELOPERS.md). The masking comes after the transpose so that the array
    the barrier sees has the default (row-major) layout. GPUs and TPUs, which run either form in
    bf16, pay for one small copy: the array is S / E the size of v (0.3 KiB per token on
    XLA:TPU)."""
    x_BGSC = jnp.swapaxes(x_BGCS, -1, -2)
    x_BGDSC = jnp.where(
        jnp.swapaxes(mask_BGCD, -1, -2)[:, :, :, None, :], x_BGSC[:, :, None, :, :], 0
    )
    return jax.lax.optimization_barrier(x_BGDSC.reshape(x_BGSC.shape[:2] + (-1, x_BGSC.shape[-1])))


def merge_directions(g_BGCX, mask_BGCD):
    """The transpose of `per_direction`: [B, G, C, X] -> [B, G, C, S] (float32)."""
    g_BGCDS = g_BGCX.reshape(mask_BGCD.shape + (-1,))
    return jnp.sum(jnp.where(mask_BGCD[..., None], g_BGCDS, 0.0), axis=3)


def per_state_row(x_BGD, X):
    """[B, G, D] -> [B, G, X, 1]: each direction's value on its S rows of X."""
    return jnp.repeat(x_BGD, X // x_BGD.shape[-1], axis=2)[..., None]


def _shift_chunks(x_BG, step, fill):
    """x[:, g - step] (step 1: the previous chunk's value; -1: the next one's), `fill` (a scalar
    or a `[B, 1]` column) past the ends. Small `[B, G]` arrays only."""
    edge = jnp.broadcast_to(jnp.asarray(fill, x_BG.dtype), x_BG[:, :1].shape)
    if step == 1:
        return jnp.concatenate([edge, x_BG[:, :-1]], axis=1)
    return jnp.concatenate([x_BG[:, 1:], edge], axis=1)


def dot(spec, x, y, dtype):
    """einsum with both operands in `dtype` and float32 accumulation (the precision policy).

    Where the math has a transposed left operand, the code builds it transposed when it is
    cheap to: attention.py's backward recomputes W^T (rows are keys: scores k q^T) and compares
    ids into the transposed `[G, G]` links, so that its big matmuls take the plain and
    right-transposed forms. XLA's CPU backend runs those in bf16 and upcasts a bf16 matmul with a
    transposed left operand to float32 with materialised converts (k_lin^T v and q_lin^T dO
    still are, on CPUs); GPUs and TPUs run every form in bf16."""
    return jnp.einsum(spec, x.astype(dtype), y.astype(dtype), preferred_element_type=_F32)


def same_segment(seg_XT):
    """[..., T] ids -> [..., T, T] mask: same segment and that segment is not padding."""
    return (seg_XT[..., :, None] == seg_XT[..., None, :]) & (seg_XT[..., :, None] != 0)
