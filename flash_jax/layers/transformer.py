"""The paper's Transformer baselines: MHSA + FFN blocks, pre-norm.

Transformer: absolute positions (added in the model wrapper) and a GELU FFN.
Transformer+: RoPE.  Transformer++: RoPE and a SwiGLU FFN (two-thirds width, same parameters).
Performer and Combiner: Transformer++ blocks whose attention is FAVOR+ (`PerformerAttention`) or
Combiner-Fixed (`CombinerAttention`); same parameters as Transformer++.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from flash_jax import dispatch, ops, sharding
from flash_jax.config import ModelConfig
from flash_jax.layers.basic import Dense, make_norm
from flash_jax.layers.positions import apply_rope
from flash_jax.sharding import LOGICAL_AXES, constrain


class MultiHeadAttention(nnx.Module):
    """Softmax attention over the document (flash_jax.ops.dot_product); decodes with a key/value
    cache. Subclasses change `attend` and the decoding state, nothing else."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        H, dh, d = cfg.num_heads, cfg.d_model // cfg.num_heads, cfg.d_model
        self.query = Dense((d,), (H, dh), ("embed", "heads", "kv"), cfg, rngs=rngs)
        self.key = Dense((d,), (H, dh), ("embed", "heads", "kv"), cfg, rngs=rngs)
        self.value = Dense((d,), (H, dh), ("embed", "heads", "kv"), cfg, rngs=rngs)
        self.out = Dense((H, dh), (d,), ("heads", "kv", "embed"), cfg, rngs=rngs)

    def project(self, x_BTD, positions_BT):
        q, k, v = self.query(x_BTD), self.key(x_BTD), self.value(x_BTD)
        if self.cfg.uses_rope:
            q, k = apply_rope(q, positions_BT), apply_rope(k, positions_BT)
        q, k, v = (checkpoint_name(t, "proj_in") for t in (q, k, v))
        return [
            constrain(t, ("batch", "length", "act_heads", None), self.cfg.sharding_rules)
            for t in (q, k, v)
        ]

    def __call__(self, x_BTD, segment_ids_BT, positions_BT):
        q, k, v = self.project(x_BTD, positions_BT)
        attended = checkpoint_name(self.attend(q, k, v, segment_ids_BT), "attn")  # save_attn keeps
        return checkpoint_name(self.out(attended), "proj_out")

    def attend(self, q, k, v, segment_ids_BT):
        """[B, T, H, dh] queries, keys, values -> [B, T, H, dh]."""
        cfg = self.cfg
        impl = cfg.attention_impl
        if sharding.sequence_axis(cfg.sharding_rules) is not None:
            # GSPMD partitions the XLA path along the sequence axis (it gathers keys and
            # values); a kernel run per device would see its own stretch's keys alone.
            if impl not in ("auto", "xla"):
                raise ValueError(
                    f"model.attention_impl={impl!r} cannot run with the sequence split over the "
                    f"mesh: use model.attention_impl=xla"
                )
            impl = "xla"
        else:
            impl = dispatch.attention_impl(impl, q.shape[1], q.shape[-1], q.dtype)

        def attend(q, k, v, segment_ids_BT):
            return ops.dot_product_attention(
                q, k, v, causal=cfg.causal, segment_ids=segment_ids_BT, impl=impl
            )

        if impl == "splash":  # a Pallas kernel: run per device on its rows and heads
            heads = ("batch", "length", "act_heads", None)
            segments = None if segment_ids_BT is None else ("batch", "length")
            attend = sharding.per_shard(
                attend, (heads, heads, heads, segments), heads, cfg.sharding_rules
            )
        return attend(q, k, v, segment_ids_BT)

    def decode(self, x_B1D, t, cache):
        """One token at position t (a scalar) of a single document; returns (output, cache)."""
        B = x_B1D.shape[0]
        q, k, v = self.project(x_B1D, jnp.full((B, 1), t, jnp.int32))
        attended, cache = self.decode_attend(q, k, v, t, cache)
        return self.out(attended.astype(v.dtype)), cache

    @staticmethod
    def init_cache(cfg: ModelConfig, batch_size: int, length: int) -> dict:
        """Keys and values of every earlier token: grows with the context."""
        shape = (batch_size, length, cfg.num_heads, cfg.d_model // cfg.num_heads)
        return {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}

    def decode_attend(self, q, k, v, t, cache):
        keys = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), t, 1)
        values = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), t, 1)
        mask = (jnp.arange(keys.shape[1]) <= t)[None, None, None, :]
        attended = jax.nn.dot_product_attention(
            q,
            keys.astype(q.dtype),
            values.astype(q.dtype),
            mask=mask,  # one query row: JAX picks the backend's kernel (None)
        )
        return attended, {"k": keys, "v": values}


class RandomFeatures(nnx.Variable):
    """Non-trained model state: drawn once at init from the seed, never updated by training."""


class PerformerAttention(MultiHeadAttention):
    """FAVOR+ attention (flash_jax.ops.performer) with `model.random_features` features per head.

    Redraw policy: none. The features W `[M, dh]` are drawn once per layer (one W shared by the
    layer's heads, as in the Performer's own code; layers draw independently) from the init seed
    and kept as non-trained state, so training, evaluation and decoding all use the same kernel:
    decoding equals the forward pass, and a trained model is one deterministic function. The
    train step and evaluation rebuild them from `config.seed` with the rest of the non-trained
    state (flash_jax.train.step), so checkpoints need not store them. Periodic redrawing (an
    option in the Performer paper) would make the trained weights depend on a schedule of
    kernels and the evaluated model differ from every trained one.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        width = cfg.d_model // cfg.num_heads
        features = ops.performer.orthogonal_random_features(
            rngs.params(), cfg.random_features, width
        )
        self.features = RandomFeatures(features, **{LOGICAL_AXES: (None, "kv")})

    def attend(self, q, k, v, segment_ids_BT):
        cfg = self.cfg
        sequence_axis = sharding.sequence_axis(cfg.sharding_rules)
        if sequence_axis is None:
            return ops.favor_attention(
                q,
                k,
                v,
                self.features.value,
                causal=cfg.causal,
                chunk_size=cfg.chunk_size,
                segment_ids=segment_ids_BT,
            )
        # Each device its stretch; the feature sums of the documents crossing its ends come
        # from the others (flash_jax/ops/context_parallel.py).
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones(q.shape[:2], jnp.int32)
        attend = functools.partial(
            ops.context_parallel.favor_attention_sharded,
            axis_name=sequence_axis,
            causal=cfg.causal,
            chunk_size=cfg.chunk_size,
        )
        heads = ("batch", "length", "act_heads", None)
        in_axes = (heads, heads, heads, None, ("batch", "length"))
        attend = sharding.per_shard(attend, in_axes, heads, cfg.sharding_rules)
        return attend(q, k, v, self.features.value, segment_ids_BT)

    @staticmethod
    def init_cache(cfg: ModelConfig, batch_size: int, length: int | None = None) -> dict:
        """sum phi(k) [v, 1]^T over earlier tokens: a constant size, whatever the context."""
        del length
        shape = (batch_size, cfg.num_heads, cfg.random_features, cfg.d_model // cfg.num_heads + 1)
        return {"state": jnp.zeros(shape, jnp.float32)}

    # Whole-document scoring's state between windows is the decoding state: sum phi(k) [v, 1]^T.
    init_window_state = init_cache

    def window_attend(self, q, k, v, positions_BW, state):
        """A window of one document's tokens after the earlier ones summed in `state`; returns
        (output, state after the window). The state enters the op as the `Boundary` before
        the window, as context parallelism passes it between devices."""
        del positions_BW
        B, W = q.shape[0], self.features.value
        boundary = ops.state_passing.Boundary(
            seg_BD=jnp.ones((B, 1), jnp.int32),
            sum_BDSE=state["state"][:, None],
            count_BD=jnp.zeros((B, 1), jnp.float32),  # unused by FAVOR+
        )
        out = ops.favor_attention(
            q, k, v, W, causal=True, chunk_size=self.cfg.chunk_size, boundary=boundary
        )
        phi_k = ops.performer.favor_features(k, W, query=False)
        return out, {"state": state["state"] + ops.performer.key_value_sums(phi_k, v)}

    def decode_attend(self, q, k, v, t, cache):
        del t
        W = self.features.value
        phi_q = ops.performer.favor_features(q[:, 0], W, query=True)
        phi_k = ops.performer.favor_features(k[:, 0], W, query=False)
        out, state = ops.performer.decode_step(phi_q, phi_k, v[:, 0], cache["state"])
        return out[:, None], {"state": state}


class CombinerAttention(MultiHeadAttention):
    """Combiner-Fixed attention (flash_jax.ops.combiner) over spans of `model.chunk_size` tokens;
    no parameters beyond the projections (max-pooled span summaries)."""

    def attend(self, q, k, v, segment_ids_BT):
        return ops.combiner_attention(
            q,
            k,
            v,
            causal=self.cfg.causal,
            span_size=self.cfg.chunk_size,
            segment_ids=segment_ids_BT,
        )

    @staticmethod
    def init_cache(cfg: ModelConfig, batch_size: int, length: int) -> dict:
        return ops.combiner.init_state(
            batch_size,
            cfg.num_heads,
            cfg.d_model // cfg.num_heads,
            cfg.chunk_size,
            length,
            cfg.compute_dtype,
        )

    @staticmethod
    def init_window_state(cfg: ModelConfig, batch_size: int, length: int) -> dict:
        """The summaries of a document's completed spans, for one of `length` tokens (a whole
        number of windows): R slots, R the power of two at or above length / C, so that
        documents of similar lengths share one compiled window step. Grows with the document
        as N / C (C times slower than a key/value cache), not constant."""
        slots = 1 << max(-(-length // cfg.chunk_size) - 1, 0).bit_length()
        shape = (batch_size, slots, cfg.num_heads, cfg.d_model // cfg.num_heads)
        return {"span_k": jnp.zeros(shape, jnp.float32), "span_v": jnp.zeros(shape, jnp.float32)}

    def window_attend(self, q, k, v, positions_BW, state):
        """A window of one document's tokens, starting at a span boundary, after the earlier
        spans summarised in `state`; returns (output, state with the window's spans added)."""
        C = self.cfg.chunk_size
        completed = positions_BW[0, 0] // C  # the document's spans before the window
        prior = ops.combiner.PriorSpans(state["span_k"], state["span_v"], completed)
        out = ops.combiner_attention(q, k, v, causal=True, span_size=C, prior=prior)
        window_summaries = ops.combiner.completed_span_summaries(q, k, v, C)

        def add(buffer_BRHD, new_BGHD):
            return jax.lax.dynamic_update_slice_in_dim(buffer_BRHD, new_BGHD, completed, 1)

        return out, {
            "span_k": add(state["span_k"], window_summaries[0]),
            "span_v": add(state["span_v"], window_summaries[1]),
        }

    def decode_attend(self, q, k, v, t, cache):
        out, state = ops.combiner.decode_step(
            q[:, 0], k[:, 0], v[:, 0], t, cache, self.cfg.chunk_size
        )
        return out[:, None], state


ATTENTION_TYPES = {"performer": PerformerAttention, "combiner": CombinerAttention}


def attention_type(cfg: ModelConfig) -> type[MultiHeadAttention]:
    return ATTENTION_TYPES.get(cfg.name, MultiHeadAttention)


class FeedForward(nnx.Module):
    """GELU MLP (Transformer, Transformer+) or SwiGLU (Transformer++)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.glu = cfg.uses_glu
        d = cfg.d_model
        # SwiGLU has three matrices: two-thirds of the hidden width keeps the parameter count.
        hidden = cfg.mlp_dim * 2 // 3 if self.glu else cfg.mlp_dim
        self.wi = Dense((d,), (hidden,), ("embed", "mlp"), cfg, rngs=rngs)
        self.wg = Dense((d,), (hidden,), ("embed", "mlp"), cfg, rngs=rngs) if self.glu else None
        self.wo = Dense((hidden,), (d,), ("mlp", "embed"), cfg, rngs=rngs)

    def __call__(self, x_BTD):
        if self.glu:
            h = jax.nn.silu(self.wg(x_BTD)) * self.wi(x_BTD)
        else:
            h = jax.nn.gelu(self.wi(x_BTD))
        h = constrain(
            checkpoint_name(h, "proj_in"), ("batch", "length", "act_mlp"), self.cfg.sharding_rules
        )
        return checkpoint_name(self.wo(h), "proj_out")


class TransformerBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention_norm = make_norm(cfg, rngs=rngs)
        self.attention = attention_type(cfg)(cfg, rngs=rngs)
        self.mlp_norm = make_norm(cfg, rngs=rngs)
        self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(self, x_BTD, segment_ids_BT, positions_BT):
        x = x_BTD + self.attention(self.attention_norm(x_BTD), segment_ids_BT, positions_BT)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", "act_embed"), self.cfg.sharding_rules)

    @staticmethod
    def init_cache(cfg: ModelConfig, batch_size: int, length: int) -> dict:
        return attention_type(cfg).init_cache(cfg, batch_size, length)

    @staticmethod
    def init_window_state(cfg: ModelConfig, batch_size: int, length: int) -> dict:
        return attention_type(cfg).init_window_state(cfg, batch_size, length)

    def window(self, x_BWD, positions_BW, state):
        """The block over a window of W tokens of one document whose earlier tokens its
        attention's `state` summarises (Performer and Combiner: `window_attend`); returns
        (output, state after the window)."""
        attention = self.attention
        q, k, v = attention.project(self.attention_norm(x_BWD), positions_BW)
        attended, state = attention.window_attend(q, k, v, positions_BW, state)
        x = x_BWD + attention.out(attended)
        return x + self.mlp(self.mlp_norm(x)), state

    def decode(self, x_B1D, t, cache):
        attended, cache = self.attention.decode(self.attention_norm(x_B1D), t, cache)
        x = x_B1D + attended
        return x + self.mlp(self.mlp_norm(x)), cache
