"""The Gated Attention Unit (FLASH-Quad layer) and the FLASH layer (mixed chunk attention).

    h       = norm(x)
    u, v, z = split(silu(dense(h, 2e + s)), [e, e, s])   # one fused projection
    out     = x + dense(u * attend(z, v), d)

See docs: the queries/keys are per-dimension scale/offset "heads" of the shared z, rotated by RoPE
at document positions; `attend` is flash_jax.ops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from flash_jax import dispatch, ops, sharding
from flash_jax.config import ModelConfig
from flash_jax.layers import projection_kernels
from flash_jax.layers.basic import Dense, make_norm, param
from flash_jax.layers.positions import RelativePositionBias, rope_sin_cos, rotate
from flash_jax.ops import context_parallel
from flash_jax.sharding import constrain


class OffsetScale(nnx.Module):
    """heads[h] = rope(z * gamma[h] + beta[h]); gamma ~ N(0, 0.02), beta = 0."""

    def __init__(self, num_heads: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.gamma = param(
            rngs, (num_heads, cfg.qk_dim), (None, "qk"), stddev=0.02, dtype=cfg.weight_dtype
        )
        self.beta = param(
            rngs, (num_heads, cfg.qk_dim), (None, "qk"), stddev=0.0, dtype=cfg.weight_dtype
        )

    def __call__(self, z_BTS: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, ...]:
        return rotated_heads(z_BTS, self.gamma.value, self.beta.value, positions_BT)


@jax.custom_vjp
def rotated_heads(z_BTS, gamma_HS, beta_HS, positions_BT) -> tuple[jax.Array, ...]:
    """The H query/key heads of the shared z, each RoPE-rotated at the document positions:
    rope(z * gamma[h] + beta[h]) in z's dtype, the rotation in float32.

    The backward is written by hand so that it is one pass over the heads' cotangents and z
    (rotated back and summed in float32): autodiff kept float32 rotations and summed gamma's and
    beta's gradients in bf16 (one FLASH layer moved 2 KiB per token more on XLA:TPU, 269.4
    against 267.4 at S = 128, e = 2048 and a 32K context on v5e; docs/benchmarks.md)."""
    dtype = z_BTS.dtype
    sin, cos = rope_sin_cos(positions_BT, z_BTS.shape[-1])
    gamma_HS, beta_HS = gamma_HS.astype(dtype), beta_HS.astype(dtype)
    return tuple(
        rotate((z_BTS * gamma_HS[h] + beta_HS[h]).astype(jnp.float32), sin, cos).astype(dtype)
        for h in range(gamma_HS.shape[0])
    )


def _rotated_heads_fwd(z_BTS, gamma_HS, beta_HS, positions_BT):
    residuals = (z_BTS, gamma_HS, beta_HS, positions_BT)
    return rotated_heads(z_BTS, gamma_HS, beta_HS, positions_BT), residuals


def _rotated_heads_bwd(residuals, d_heads):
    z_BTS, gamma_HS, beta_HS, positions_BT = residuals
    sin, cos = rope_sin_cos(positions_BT, z_BTS.shape[-1])
    z32 = z_BTS.astype(jnp.float32)
    gamma32 = gamma_HS.astype(z_BTS.dtype).astype(jnp.float32)  # the forward's operand
    token_axes = tuple(range(z_BTS.ndim - 1))
    d_z, d_gamma, d_beta = 0.0, [], []
    for h, d_head in enumerate(d_heads):
        d_pre = rotate(d_head.astype(jnp.float32), -sin, cos)  # the rotation's transpose
        d_z = d_z + d_pre * gamma32[h]
        d_gamma.append(jnp.sum(d_pre * z32, axis=token_axes))
        d_beta.append(jnp.sum(d_pre, axis=token_axes))
    return (
        d_z.astype(z_BTS.dtype),
        jnp.stack(d_gamma).astype(gamma_HS.dtype),
        jnp.stack(d_beta).astype(beta_HS.dtype),
        None,
    )


rotated_heads.defvjp(_rotated_heads_fwd, _rotated_heads_bwd)


class _GatedUnit(nnx.Module):
    """What GAU and FLASH share: norm, fused projection, heads, bias, gate and output projection."""

    num_qk_heads: int
    bias_span: int

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        e, s = cfg.expansion_dim, cfg.qk_dim
        self.norm = make_norm(cfg, rngs=rngs)
        self.proj_in = Dense((cfg.d_model,), (2 * e + s,), ("embed", "mlp"), cfg, rngs=rngs)
        self.heads = OffsetScale(self.num_qk_heads, cfg, rngs=rngs)
        kind = cfg.rel_pos_kind
        self.rel_bias = (
            None if kind == "none" else RelativePositionBias(kind, self.bias_span, cfg, rngs=rngs)
        )
        self.proj_out = Dense((e,), (cfg.d_model,), ("mlp", "embed"), cfg, rngs=rngs)

    def project(self, x_BTD: jax.Array, positions_BT: jax.Array):
        """u's pre-activation (the gate: `output` applies its SiLU), v [B, T, e] and the
        RoPE-rotated query/key heads [B, T, s] of the input."""
        u_pre, v, z = self.projections(x_BTD)
        u_pre = constrain(u_pre, ("batch", "length", "act_mlp"), self.cfg.sharding_rules)
        v = constrain(v, ("batch", "length", "act_mlp"), self.cfg.sharding_rules)
        return u_pre, v, self.heads(z, positions_BT)

    def projections(self, x_BTD: jax.Array) -> tuple[jax.Array, ...]:
        """u's pre-activation and v, z = silu(their pre-activations) [B, T, e | e | s], from
        norm(x) . W_in + b_in cut into three parts: one Pallas kernel forward and one backward
        where `model.proj_impl` asks for it and it serves (flash_jax/layers/projection_kernels.py),
        else XLA's ops. Every array the backward reads of them is tagged "proj_in", so that a
        remat policy that keeps the tag recomputes no projection."""
        e, s = self.cfg.expansion_dim, self.cfg.qk_dim
        num_tokens = x_BTD.shape[0] * x_BTD.shape[1]
        if projection_kernels.norm_projection_serves(self.cfg, self.proj_in, num_tokens):
            # The kernel applies the SiLUs and their backward: it tags v's and z's
            # pre-activations (its residuals), and the outputs are tagged here.
            outputs = projection_kernels.norm_projection(self.cfg, self.norm, self.proj_in, x_BTD)
            return tuple(checkpoint_name(y, "proj_in") for y in outputs)
        pre = self.proj_in.split_outputs(self.norm(x_BTD), (e, e, s))
        # Tagged before the SiLU: its backward needs the pre-activation.
        u_pre, v_pre, z_pre = (checkpoint_name(y, "proj_in") for y in pre)
        return u_pre, jax.nn.silu(v_pre), jax.nn.silu(z_pre)

    def output(self, x_BTD: jax.Array, u_pre_BTE: jax.Array, attended_BTE: jax.Array) -> jax.Array:
        """x + (silu(u_pre) * attended) . W_o + b_o: the gate, the output projection and the
        residual. The gate's SiLU is here, not in `project`, so that the Pallas kernel
        (`model.proj_impl`) applies it and its backward in VMEM."""
        attended_BTE = checkpoint_name(attended_BTE, "attn")  # kept by remat `save_attn`
        num_tokens = x_BTD.shape[0] * x_BTD.shape[1]
        if projection_kernels.gated_output_serves(self.cfg, self.proj_out, num_tokens):
            return projection_kernels.gated_output(
                self.cfg, self.proj_out, x_BTD, u_pre_BTE, attended_BTE
            )
        u_BTE = jax.nn.silu(u_pre_BTE)
        gated = checkpoint_name(u_BTE * attended_BTE.astype(u_BTE.dtype), "gated")
        out = checkpoint_name(self.proj_out(gated), "proj_out")
        return constrain(
            x_BTD + out.astype(x_BTD.dtype),
            ("batch", "length", "act_embed"),
            self.cfg.sharding_rules,
        )

    def bias(self, length: int):
        return None if self.rel_bias is None else self.rel_bias(length)


class GAULayer(_GatedUnit):
    """FLASH-Quad layer: exact quadratic relu^2 attention over the whole (packed) sequence."""

    num_qk_heads = 2

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.bias_span = cfg.max_len
        super().__init__(cfg, rngs=rngs)

    def __call__(self, x_BTD, segment_ids_BT, positions_BT):
        u, v, (q, k) = self.project(x_BTD, positions_BT)
        T = x_BTD.shape[1]
        attended = ops.quadratic_attention(
            q,
            k,
            v,
            n=self.cfg.max_len,
            causal=self.cfg.causal,
            segment_ids=segment_ids_BT,
            bias=self.bias(T),
        )
        return self.output(x_BTD, u, attended)

    @staticmethod
    def init_cache(cfg: ModelConfig, batch_size: int, length: int) -> dict:
        """Keys (rotated) and values of every earlier token: grows with the context."""
        return {
            "k": jnp.zeros((batch_size, length, cfg.qk_dim), cfg.compute_dtype),
            "v": jnp.zeros((batch_size, length, cfg.expansion_dim), cfg.compute_dtype),
        }

    def decode(self, x_B1D, t, cache):
        """One token at position t (a scalar) of a single document; returns (output, cache)."""
        B = x_B1D.shape[0]
        u, v, (q, k) = self.project(x_B1D, jnp.full((B, 1), t, jnp.int32))
        keys = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), t, 1)
        values = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), t, 1)
        index = jnp.arange(keys.shape[1])
        scores = jnp.einsum("bs,bls->bl", q[:, 0], keys, preferred_element_type=jnp.float32)
        scores = scores / self.cfg.max_len
        if self.rel_bias is not None:
            scores = scores + self.rel_bias.rows(jnp.reshape(t, (1,)), index)
        weights = jnp.where(index <= t, jnp.square(jax.nn.relu(scores)), 0.0)
        attended = jnp.einsum("bl,ble->be", weights, values.astype(jnp.float32))
        out = self.output(x_B1D, u, attended[:, None].astype(v.dtype))
        return out, {"k": keys, "v": values}


class FlashLayer(_GatedUnit):
    """FLASH layer: quadratic attention inside chunks plus linear attention across chunks."""

    num_qk_heads = 4

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.bias_span = cfg.chunk_size
        super().__init__(cfg, rngs=rngs)

    def __call__(self, x_BTD, segment_ids_BT, positions_BT):
        cfg = self.cfg
        u, v, (quad_q, quad_k, lin_q, lin_k) = self.project(x_BTD, positions_BT)
        impl = dispatch.flash_impl(cfg.flash_impl)

        def attend(quad_q, quad_k, lin_q, lin_k, v, segment_ids_BT, quad_bias):
            return ops.mixed_chunk_attention(
                quad_q,
                quad_k,
                lin_q,
                lin_k,
                v,
                chunk_size=cfg.chunk_size,
                causal=cfg.causal,
                segment_ids=segment_ids_BT,
                quad_bias=quad_bias,
                impl=impl,
            )

        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones(x_BTD.shape[:2], jnp.int32)
        keys, values = ("batch", "length", None), ("batch", "length", "act_mlp")
        in_axes = (keys, keys, keys, keys, values, ("batch", "length"), None)
        sequence_axis = sharding.sequence_axis(cfg.sharding_rules)
        if sequence_axis is not None:  # each device its stretch, edge states between them
            if impl != "xla":
                raise ValueError(
                    f"model.flash_impl={impl!r} cannot run with the sequence sharded over the "
                    f"mesh (context parallelism runs the XLA path): use model.flash_impl=xla"
                )
            attend = functools.partial(
                context_parallel.mixed_chunk_attention_sharded,
                axis_name=sequence_axis,
                chunk_size=cfg.chunk_size,
                causal=cfg.causal,
            )
            attend = sharding.per_shard(attend, in_axes, values, cfg.sharding_rules)
        elif impl != "xla":  # a Pallas kernel: each device runs it on its own rows (and E slice)
            attend = sharding.per_shard(attend, in_axes, values, cfg.sharding_rules)
        attended = attend(
            quad_q, quad_k, lin_q, lin_k, v, segment_ids_BT, self.bias(cfg.chunk_size)
        )
        return self.output(x_BTD, u, attended)

    @staticmethod
    def init_cache(cfg: ModelConfig, batch_size: int, length: int | None = None) -> dict:
        """The constant-size causal state: the linear part's sum and count over completed chunks,
        the current chunk's running sum (folded in when the chunk completes), and its quadratic
        keys and values. `length` is unused: nothing grows with the context."""
        del length
        C, s, e = cfg.chunk_size, cfg.qk_dim, cfg.expansion_dim
        return {
            "sum": jnp.zeros((batch_size, s, e), jnp.float32),
            "count": jnp.zeros((), jnp.float32),
            "chunk_sum": jnp.zeros((batch_size, s, e), jnp.float32),
            "quad_k": jnp.zeros((batch_size, C, s), cfg.compute_dtype),
            "v": jnp.zeros((batch_size, C, e), cfg.compute_dtype),
        }

    @staticmethod
    def init_window_state(cfg: ModelConfig, batch_size: int, length: int | None = None) -> dict:
        """Whole-document scoring's state between windows: the linear part's sum of k_lin v^T
        over the document's completed chunks and their token count (`init_cache`'s `sum` and
        `count`); constant, whatever the document's `length`."""
        del length
        return {
            "sum": jnp.zeros((batch_size, cfg.qk_dim, cfg.expansion_dim), jnp.float32),
            "count": jnp.zeros((), jnp.float32),
        }

    def window(self, x_BWD, positions_BW, state):
        """The layer over a window of W = G * C tokens of one document whose earlier chunks are
        summarised by `state` ({"sum" [B, s, e], "count" []}); returns (output, state after it).

        The layer's own op, `ops.mixed_chunk_attention`, with the state as the `Boundary` before
        the window (as context parallelism passes it between devices): every token's linear part
        is the mean of k_lin v^T over every completed chunk of the document before its own. The
        padding after a document's last token comes after it and changes nothing before it.
        """
        cfg = self.cfg
        B, W, _ = x_BWD.shape
        u, v, (quad_q, quad_k, lin_q, lin_k) = self.project(x_BWD, positions_BW)
        one_document_BW = jnp.ones((B, W), jnp.int32)
        boundary = ops.state_passing.Boundary(
            seg_BD=jnp.ones((B, 1), jnp.int32),
            sum_BDSE=state["sum"][:, None],
            count_BD=jnp.broadcast_to(state["count"], (B, 1)),
        )
        attended = ops.mixed_chunk_attention(
            quad_q,
            quad_k,
            lin_q,
            lin_k,
            v,
            chunk_size=cfg.chunk_size,
            causal=True,
            segment_ids=one_document_BW,
            quad_bias=self.bias(cfg.chunk_size),
            boundary=boundary,
        )
        window_sum_BSE = jnp.einsum("bws,bwe->bse", lin_k, v, preferred_element_type=jnp.float32)
        new_state = {"sum": state["sum"] + window_sum_BSE, "count": state["count"] + W}
        return self.output(x_BWD, u, attended), new_state

    def decode(self, x_B1D, t, cache):
        """One token at position t (a scalar) of a single document; returns (output, cache)."""
        B, C = x_B1D.shape[0], self.cfg.chunk_size
        u, v, (quad_q, quad_k, lin_q, lin_k) = self.project(x_B1D, jnp.full((B, 1), t, jnp.int32))
        slot = t % C

        def put(buffer, new):
            return jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), slot, 1)

        quad_keys, values = put(cache["quad_k"], quad_k), put(cache["v"], v)
        index = jnp.arange(C)
        scores = (
            jnp.einsum("bs,bcs->bc", quad_q[:, 0], quad_keys, preferred_element_type=jnp.float32)
            / C
        )
        if self.rel_bias is not None:
            scores = scores + self.rel_bias.rows(jnp.reshape(slot, (1,)), index)
        weights = jnp.where(index <= slot, jnp.square(jax.nn.relu(scores)), 0.0)
        quad = jnp.einsum("bc,bce->be", weights, values.astype(jnp.float32))
        # Linear part: the mean over completed chunks (none in the first chunk: 0, not 0/0).
        lin = jnp.einsum("bs,bse->be", lin_q[:, 0].astype(jnp.float32), cache["sum"])
        lin = jnp.where(cache["count"] > 0, lin / jnp.maximum(cache["count"], 1.0), 0.0)
        out = self.output(x_B1D, u, (quad + lin)[:, None].astype(v.dtype))

        # This token joins its chunk's running sum; when it completes the chunk, the chunk's sum
        # joins the linear part (which only ever sees completed chunks).
        chunk_sum = cache["chunk_sum"] + jnp.einsum(
            "bs,be->bse", lin_k[:, 0], v[:, 0], preferred_element_type=jnp.float32
        )
        complete = slot == C - 1
        return out, {
            "sum": jnp.where(complete, cache["sum"] + chunk_sum, cache["sum"]),
            "count": cache["count"] + jnp.where(complete, float(C), 0.0),
            "chunk_sum": jnp.where(complete, 0.0, chunk_sum),
            "quad_k": quad_keys,
            "v": values,
        }
