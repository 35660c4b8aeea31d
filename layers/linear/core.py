"""Linear attention, one mechanism for every kernelised mixer (linear, performer, transnormer, sla, ecoformer).

Given feature-mapped queries and keys phi(q), phi(k) [B, T, N, F] and values v [B, T, N, H],

    num_i = sum_{j in S(i)} (phi(q_i) . phi(k_j)) v_j

where S(i) is the tokens of i's segment (bidirectional) or those up to and including i
(causal). Normalised linear attention divides by the same sum with v_j = 1, so it runs
the identical computation on values with a ones column appended: one code path.

Causal uses the chunk-parallel form (Katharopoulos et al. sec. 3.2; docs/papers.md#linear): the
length is cut into chunks of C tokens; within a chunk a masked C x C product, across
chunks a carried state S = sum phi(k_j) v_j^T [B, N, F, H]. Cost O(T C F + T F H),
memory O(T C + (T/C) F H). Bidirectional is the causal pass plus the exclusive causal
pass over the reversed row, so packed rows never mix segments without a per-segment
state table.

Segments (packing): a segment is a contiguous run of one nonzero id. The carried state
restarts where a run starts; padding tokens (id 0) contribute nothing, produce zeros,
and do not break the run around them (ids are forward-filled across padding), so a
right-padded prompt decodes like an unpadded one. Ids must not repeat after another id:
tokens with equal ids inside one chunk are treated as one segment, so two runs of the same
id separated by another id are kept apart only across chunk boundaries. Packing gives
each example its own increasing id, so this never arises in training.

The state after a call, (S, id of the last run), is both the decode cache and the
summary the sequence-parallel scan exchanges (`sp_summary_*` below).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LinearState(NamedTuple):
  """Carried state: S [B, N, F, H] (fp32) summed over the current run, and that run's id [B]."""
  kv: jax.Array
  segment: jax.Array

  @staticmethod
  def zeros(batch: int, heads: int, features: int, width: int) -> "LinearState":
    return LinearState(jnp.zeros((batch, heads, features, width), jnp.float32), jnp.full((batch,), -1, jnp.int32))


def forward_fill(segment_ids_bt: jax.Array, initial_b: jax.Array | None = None) -> jax.Array:
  """Replaces each padding id (0) by the last nonzero id before it (or `initial_b`, else 0)."""
  seg = segment_ids_bt.astype(jnp.int32)
  if initial_b is not None:
    seg = jnp.concatenate([initial_b.astype(jnp.int32)[:, None], seg], axis=1)
  filled = jax.lax.associative_scan(lambda a, b: jnp.where(b != 0, b, a), seg, axis=1)
  return filled[:, 1:] if initial_b is not None else filled


def causal_linear_scan(q_btnf, k_btnf, v_btnh, segment_ids_bt, *, chunk: int = 64, inclusive: bool = True,
                       state: LinearState | None = None, runs_bt: jax.Array | None = None):
  """Unnormalised causal linear attention; returns (num [B, T, N, H] fp32, final LinearState).

  `inclusive=False` excludes the diagonal (j < i). `state` is the state entering the row
  (decode, or the incoming state of a sequence-parallel chunk). `runs_bt` overrides the
  run ids computed from the segment ids (a sequence-parallel chunk forward-fills across
  devices).
  """
  b, t, n, f = q_btnf.shape
  h = v_btnh.shape[-1]
  if state is None:
    state = LinearState.zeros(b, n, f, h)
  valid = segment_ids_bt != 0
  run = forward_fill(segment_ids_bt, state.segment) if runs_bt is None else runs_bt.astype(jnp.int32)
  q = jnp.where(valid[:, :, None, None], q_btnf.astype(jnp.float32), 0.0)
  k = jnp.where(valid[:, :, None, None], k_btnf.astype(jnp.float32), 0.0)
  v = v_btnh.astype(jnp.float32)
  c = max(1, min(chunk, t))
  pad = -t % c
  if pad:  # padded tokens continue the last run with zero keys: they change nothing
    edge = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q, k, v = edge(q), edge(k), edge(v)
    run = jnp.concatenate([run, jnp.broadcast_to(run[:, -1:], (b, pad))], axis=1)
  nc = (t + pad) // c
  qc, kc, vc = (x.reshape(b, nc, c, n, x.shape[-1]) for x in (q, k, v))
  rc = run.reshape(b, nc, c)

  # Within each chunk: the masked C x C product.
  i, j = jnp.arange(c)[:, None], jnp.arange(c)[None, :]
  tri = (j <= i) if inclusive else (j < i)
  mask = tri & (rc[:, :, :, None] == rc[:, :, None, :])  # [B, nc, C, C]
  scores = jnp.einsum("bxinf,bxjnf->bxnij", qc, kc) * mask[:, :, None].astype(jnp.float32)
  num = jnp.einsum("bxnij,bxjnh->bxinh", scores, vc)

  # Across chunks: each chunk's contribution to the state is the sum over its last run;
  # the state carries into a chunk only while the run continues.
  last = rc[:, :, -1]  # [B, nc]
  prev_last = jnp.concatenate([state.segment[:, None], last[:, :-1]], axis=1)
  in_last = (rc == last[:, :, None]).astype(jnp.float32)
  kv_chunk = jnp.einsum("bxjnf,bxj,bxjnh->bxnfh", kc, in_last, vc)
  keep = (last == prev_last).astype(jnp.float32)  # whole chunk continues the incoming run

  def step(s, inp):
    keep_x, kv_x = inp
    return s * keep_x[:, None, None, None] + kv_x, s

  s_final, s_in = jax.lax.scan(step, state.kv, (keep.T, jnp.moveaxis(kv_chunk, 1, 0)))
  s_in = jnp.moveaxis(s_in, 0, 1)  # [B, nc, N, F, H]: state entering each chunk
  sees_state = (rc == prev_last[:, :, None]).astype(jnp.float32)  # token continues the incoming run
  num = num + jnp.einsum("bxinf,bxnfh,bxi->bxinh", qc, s_in, sees_state)
  num = num.reshape(b, nc * c, n, h)[:, :t]
  return num, LinearState(s_final, run[:, -1])


def linear_attention(q_btnf, k_btnf, v_btnh, segment_ids_bt, *, causal: bool, normalize: bool = True,
                     eps: float = 1e-6, chunk: int = 64, state: LinearState | None = None):
  """Linear attention with feature-mapped q, k; returns (out [B, T, N, H] in v's dtype, final state).

  normalize=True divides by phi(q_i) . sum_j phi(k_j) + eps (Linear Transformer, Performer,
  SLA); False returns the raw sum (TransNormer's NormAttention normalises afterwards).
  The state (decode only) has width H + 1 when normalising: the denominator rides along.
  """
  v = v_btnh.astype(jnp.float32)
  if normalize:
    v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
  num, new_state = causal_linear_scan(q_btnf, k_btnf, v, segment_ids_bt, chunk=chunk, state=state)
  if not causal:
    if state is not None:
      raise ValueError("bidirectional linear attention has no incoming state (decode is causal only)")
    flip = lambda x: jnp.flip(x, axis=1)
    rev, _ = causal_linear_scan(flip(q_btnf), flip(k_btnf), flip(v), flip(segment_ids_bt), chunk=chunk,
                                inclusive=False)
    num = num + flip(rev)
  return finish(num, segment_ids_bt, normalize, eps).astype(v_btnh.dtype), new_state


def finish(num_btnh, segment_ids_bt, normalize: bool, eps: float) -> jax.Array:
  """Numerator (and denominator column) -> output; padding rows are zero."""
  if normalize:
    num_btnh = num_btnh[..., :-1] / (num_btnh[..., -1:] + eps)
  return jnp.where((segment_ids_bt != 0)[:, :, None, None], num_btnh, 0.0)


def reference_linear_attention(q_btnf, k_btnf, v_btnh, segment_ids_bt, *, causal: bool, normalize: bool = True,
                               eps: float = 1e-6) -> jax.Array:
  """The naive O(T^2) masked form, for tests: explicit (phi(q) phi(k)^T) * mask, then @ v."""
  seg = segment_ids_bt
  mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
  if causal:
    t = seg.shape[1]
    mask &= jnp.arange(t)[None, :, None] >= jnp.arange(t)[None, None, :]
  a = jnp.einsum("binf,bjnf->bnij", q_btnf.astype(jnp.float32), k_btnf.astype(jnp.float32))
  a = a * mask[:, None].astype(jnp.float32)
  num = jnp.einsum("bnij,bjnh->binh", a, v_btnh.astype(jnp.float32))
  if normalize:
    num = num / (jnp.sum(a, axis=-1).transpose(0, 2, 1)[..., None] + eps)
  return jnp.where((seg != 0)[:, :, None, None], num, 0.0).astype(v_btnh.dtype)


def recurrent_linear_attention(q_btnf, k_btnf, v_btnh, segment_ids_bt, *, normalize: bool = True,
                               eps: float = 1e-6) -> jax.Array:
  """Causal, one token at a time (S_t = S_{t-1} + phi(k_t) v_t^T, o_t = phi(q_t) S_t), for tests."""
  b, t, n, f = q_btnf.shape
  v = v_btnh.astype(jnp.float32)
  if normalize:
    v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
  run = forward_fill(segment_ids_bt)

  def step(carry, inp):
    s, prev = carry
    q, k, vv, r, valid = inp
    s = jnp.where((r == prev)[:, None, None, None], s, 0.0)
    s = s + jnp.einsum("bnf,bnh->bnfh", jnp.where(valid[:, None, None], k, 0.0), vv)
    return (s, r), jnp.einsum("bnf,bnfh->bnh", q, s)

  init = (jnp.zeros((b, n, f, v.shape[-1]), jnp.float32), jnp.full((b,), -1, jnp.int32))
  xs = (q_btnf.astype(jnp.float32), k_btnf.astype(jnp.float32), v, run, segment_ids_bt != 0)
  _, num = jax.lax.scan(step, init, jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), xs))
  return finish(jnp.moveaxis(num, 0, 1), segment_ids_bt, normalize, eps).astype(v_btnh.dtype)
