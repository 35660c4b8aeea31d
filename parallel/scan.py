"""Sequence-parallel scans: one mechanism for every recurrent mixer (linear attention, SSMs).

A mixer whose state after a chunk is an associative summary supplies three functions:

* `chunk_fn(xs) -> (ys, summary)`: its chunk computed from a zero incoming state;
* `combine_fn(earlier, later) -> summary`: the associative composition of summaries
  (linear attention: sums of K^T V; a diagonal linear recurrence / Mamba:
  (decay product, state) with (a1, h1) o (a2, h2) = (a1 a2, a2 h1 + h2));
* `apply_fn(ys, xs, incoming) -> ys`: its chunk corrected for the state coming in.

Each device runs `chunk_fn` on its own chunk of the length, the (tiny) summaries are
all-gathered over the `sequence` axis, an exclusive prefix of them gives each device
the state entering its chunk, and `apply_fn` corrects the chunk. Per-device shapes:
inputs [b, T/n, ...] stay local; summaries [n, ...] are the only collective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from layers import axes
from layers.mixer_base import SUMMARY
from parallel.strategy import AXIS, Strategy


def exclusive_prefix(summaries, combine_fn, identity):
  """[n, ...] summaries -> [n, ...] where entry i combines entries 0..i-1 (identity for 0)."""
  inclusive = jax.lax.associative_scan(combine_fn, summaries, axis=0)
  shift = lambda ident, inc: jnp.concatenate([ident[None], inc[:-1]], axis=0)
  return jax.tree.map(shift, identity, inclusive)


def sequence_parallel_scan(chunk_fn, combine_fn, apply_fn, identity, xs, *, mesh: Mesh, in_specs, out_specs):
  """Runs a chunked recurrence with the length split over `sequence`.

  `identity` is the summary of an empty chunk (a pytree of arrays shaped like one
  device's summary). `in_specs`/`out_specs` are the PartitionSpecs of `xs` and of
  the outputs; their length dimension must be sharded over "sequence".
  """

  def body(*local_xs):
    ys, summary = chunk_fn(*local_xs)
    # [..] per device -> [n, ..] on every device: the only communication.
    gathered = jax.tree.map(lambda s: jax.lax.all_gather(s, AXIS, axis=0), summary)
    prefix = exclusive_prefix(gathered, combine_fn, identity)
    me = jax.lax.axis_index(AXIS)
    incoming = jax.tree.map(lambda p: p[me], prefix)
    return apply_fn(ys, local_xs, incoming)

  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*xs)


# -- the simplest client: a diagonal linear recurrence h_t = a_t * h_{t-1} + b_t -----------------


def reference_linear_recurrence(a_btd, b_btd):
  """Sequential scan (the obviously-correct twin)."""
  def step(h, ab):
    a, b = ab
    h = a * h + b
    return h, h
  h0 = jnp.zeros(a_btd[:, 0].shape, a_btd.dtype)
  _, hs = jax.lax.scan(step, h0, (jnp.swapaxes(a_btd, 0, 1), jnp.swapaxes(b_btd, 0, 1)))
  return jnp.swapaxes(hs, 0, 1)


def _linear_combine(earlier, later):
  a1, h1 = earlier
  a2, h2 = later
  return a1 * a2, a2 * h1 + h2


def linear_recurrence_chunk(a_btd, b_btd):
  """Chunk from zero state: all h_t plus the chunk summary (prod a, h_last), via associative_scan."""
  prods, hs = jax.lax.associative_scan(_linear_combine, (a_btd, b_btd), axis=1)
  return (hs, prods), (prods[:, -1], hs[:, -1])


def sp_linear_recurrence(a_btd, b_btd, *, mesh: Mesh, spec):
  """h_t = a_t h_{t-1} + b_t with T split over `sequence` (spec: PartitionSpec of [B, T, D])."""
  b, _, d = a_btd.shape
  batch_shards = 1
  for ax in (spec[0] if isinstance(spec[0], tuple) else (spec[0],)):
    batch_shards *= mesh.shape[ax] if ax else 1
  feat_shards = mesh.shape[spec[2]] if len(spec) > 2 and spec[2] else 1
  local = (b // batch_shards, d // feat_shards)
  identity = (jnp.ones(local, a_btd.dtype), jnp.zeros(local, a_btd.dtype))

  def apply(ys, xs, incoming):
    hs, prods = ys
    a_in, h_in = incoming
    del a_in, xs
    return hs + prods * h_in[:, None, :]  # the incoming state decays through the chunk

  return sequence_parallel_scan(linear_recurrence_chunk, _linear_combine, apply, identity, (a_btd, b_btd),
                                mesh=mesh, in_specs=(spec, spec), out_specs=spec)


# -- linear attention (layers/linear/core.py) -------------------------------------------------
#
# A device's chunk acts on the incoming state like S_out = a * S_in + S_chunk, where
# a = 1 iff the whole chunk continues the run the incoming state belongs to. Its summary
# is (first run id, last run id, uniform: one run throughout, S_chunk); composing
# (f1, l1, u1, S1) then (f2, l2, u2, S2) gives (f1, l2, u1 & u2 & l1 == f2,
# S2 + [u2 & f2 == l1] S1), which is associative. A token then adds phi(q) S_in when it
# continues the incoming run (its run id equals the incoming last id).

_NO_RUN = -2  # the run id of "no tokens yet": equal to no real run (ids >= -1)


def _linear_attention_combine(earlier, later):
  f1, l1, u1, s1 = earlier
  f2, l2, u2, s2 = later
  carry = u2 & (f2 == l1)
  return f1, l2, u1 & u2 & (l1 == f2), s2 + jnp.where(carry[..., None, None, None], s1, 0.0)


def _linear_direction(q, k, v, seg, seg_all, *, chunk, inclusive, reverse, n):
  """One causal direction over the whole row, the length split over `sequence`."""
  from layers.linear.core import causal_linear_scan, forward_fill
  me = jax.lax.axis_index(AXIS)
  pos = (n - 1 - me) if reverse else me  # this chunk's place along the scanned direction
  t = q.shape[1]
  if reverse:
    q, k, v, seg, seg_all = (jnp.flip(x, axis=1) for x in (q, k, v, seg, seg_all))
  runs = jax.lax.dynamic_slice_in_dim(forward_fill(seg_all), pos * t, t, axis=1)
  num, state = causal_linear_scan(q, k, v, seg, chunk=chunk, inclusive=inclusive, runs_bt=runs)
  summary = (runs[:, 0], runs[:, -1], jnp.all(runs == runs[:, :1], axis=1), state.kv)
  gathered = jax.tree.map(lambda s: jax.lax.all_gather(s, AXIS, axis=0), summary)
  if reverse:  # device n-1 holds the first chunk of the reversed row
    gathered = jax.tree.map(lambda s: jnp.flip(s, axis=0), gathered)
  b = q.shape[0]
  identity = (jnp.full((b,), _NO_RUN, jnp.int32), jnp.full((b,), _NO_RUN, jnp.int32), jnp.ones((b,), bool),
              jnp.zeros_like(state.kv))
  prefix = exclusive_prefix(gathered, _linear_attention_combine, identity)
  _, last_in, _, s_in = jax.tree.map(lambda p: p[pos], prefix)
  sees = (runs == last_in[:, None]).astype(jnp.float32)
  num = num + jnp.einsum("btnf,bnfh,bt->btnh", jnp.where((seg != 0)[:, :, None, None], q.astype(jnp.float32), 0.0),
                         s_in, sees)
  return jnp.flip(num, axis=1) if reverse else num


def sp_linear_attention(q_btnf, k_btnf, v_btnh, segment_ids_bt, *, mesh: Mesh, qk_spec, v_spec, tok_spec,
                        causal: bool, normalize: bool, eps: float, chunk: int):
  """`layers.linear.core.linear_attention` with the length sharded over `sequence`.

  Per device: its chunk's scan from a zero state, one all-gather of [b] run ids and
  [b, N, F, H] states per direction, and a rank-F correction of its chunk. The [b, t]
  segment ids are all-gathered so runs continue across device boundaries.
  """
  from layers.linear.core import finish
  n = mesh.shape[AXIS]

  def body(q, k, v, seg):
    v = v.astype(jnp.float32)
    if normalize:
      v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
    seg_all = jax.lax.all_gather(seg, AXIS, axis=1, tiled=True)
    kw = dict(chunk=chunk, n=n)
    num = _linear_direction(q, k, v, seg, seg_all, inclusive=True, reverse=False, **kw)
    if not causal:
      num = num + _linear_direction(q, k, v, seg, seg_all, inclusive=False, reverse=True, **kw)
    return finish(num, seg, normalize, eps).astype(v_btnh.dtype)

  return jax.shard_map(body, mesh=mesh, in_specs=(qk_spec, qk_spec, v_spec, tok_spec), out_specs=v_spec,
                       check_vma=False)(q_btnf, k_btnf, v_btnh, segment_ids_bt.astype(jnp.int32))


# -- Mamba's selective scan (layers/ssm/mamba.py) ---------------------------------------------
#
# A device's chunk maps the incoming state h to decay * h + h_chunk, decay = exp(A sum delta)
# (0 if a segment starts inside the chunk): the (decay, state) pairs compose by
# (a1, h1) o (a2, h2) = (a1 a2, a2 h1 + h2). Each device scans its chunk from a zero state
# for its summary, the summaries are all-gathered ([n, b, E, S], the only collective), and
# the chunk is scanned again from the state entering it. The second pass costs a second
# scan but keeps the chunked scan's O(chunk) memory (the correction C_t prod(decay) h_in
# would need the [b, t, E, S] cumulative decays).


def sp_selective_scan(x_bte, delta_bte, a_es, b_bts, c_bts, reset_bt, *, mesh: Mesh, act_spec, state_spec,
                      tok_spec, a_spec, impl: str, chunk: int):
  """`layers.ssm.mamba.selective_scan` (zero incoming state) with the length sharded over `sequence`."""
  from layers.ssm.mamba import chunk_decay, combine, selective_scan

  def body(x, delta, a, b, c, reset):
    _, h_local = selective_scan(x, delta, a, b, c, reset_bt=reset, impl=impl, chunk=chunk)
    summary = (chunk_decay(delta, a, reset), h_local)
    gathered = jax.tree.map(lambda s: jax.lax.all_gather(s, AXIS, axis=0), summary)
    identity = (jnp.ones_like(h_local), jnp.zeros_like(h_local))
    _, h_in = jax.tree.map(lambda p: p[jax.lax.axis_index(AXIS)], exclusive_prefix(gathered, combine, identity))
    return selective_scan(x, delta, a, b, c, reset_bt=reset, h0_bds=h_in, impl=impl, chunk=chunk)[0]

  return jax.shard_map(body, mesh=mesh, in_specs=(act_spec, act_spec, a_spec, state_spec, state_spec, tok_spec),
                       out_specs=act_spec, check_vma=False)(x_bte, delta_bte, a_es, b_bts, c_bts, reset_bt)


def sp_ssd(x_bthp, dt_bth, a_h, b_btgn, c_btgn, reset_bt, *, mesh: Mesh, x_spec, dt_spec, a_spec, bc_spec,
           tok_spec, impl: str, chunk: int):
  """`layers.ssm.mamba2.ssd` (zero incoming state) with the length sharded over `sequence`: the
  same two passes as `sp_selective_scan`, with Mamba-2's per-head decay [b, H, 1, 1]."""
  from layers.ssm.mamba import combine
  from layers.ssm.mamba2 import ssd, ssd_chunk_decay

  def body(x, dt, a, b, c, reset):
    _, h_local = ssd(x, dt, a, b, c, reset_bt=reset, impl=impl, chunk=chunk)
    summary = (ssd_chunk_decay(dt, a, reset), h_local)
    gathered = jax.tree.map(lambda s: jax.lax.all_gather(s, AXIS, axis=0), summary)
    identity = (jnp.ones_like(summary[0]), jnp.zeros_like(h_local))
    _, h_in = jax.tree.map(lambda p: p[jax.lax.axis_index(AXIS)], exclusive_prefix(gathered, combine, identity))
    return ssd(x, dt, a, b, c, reset_bt=reset, h0_bhpn=h_in, impl=impl, chunk=chunk)[0]

  return jax.shard_map(body, mesh=mesh, in_specs=(x_spec, dt_spec, a_spec, bc_spec, bc_spec, tok_spec),
                       out_specs=x_spec, check_vma=False)(x_bthp, dt_bth, a_h, b_btgn, c_btgn, reset_bt)


class Scan(Strategy):
  """The length stays sharded; each device scans its chunk and the chunk summaries are combined
  across devices (nothing O(T) moves except the [b, T] segment ids)."""

  name = "scan"
  needs = SUMMARY
  doc = "recurrent mixers: each device scans its chunk, chunk states combined across devices"

  def linear_attention(self, phi_q, phi_k, v, segment_ids, *, causal: bool, normalize: bool, eps: float, chunk: int):
    """Linear attention (layers/linear/core.py) with the length sharded."""
    qk_spec, _, tok_spec = self.attention_specs(phi_q, phi_k)
    v_spec, _, _ = self.attention_specs(v, v)
    return sp_linear_attention(phi_q, phi_k, v, segment_ids, mesh=self.mesh, qk_spec=qk_spec, v_spec=v_spec,
                               tok_spec=tok_spec, causal=causal, normalize=normalize, eps=eps, chunk=chunk)

  def selective_scan(self, x_bte, delta_bte, a_es, b_bts, c_bts, reset_bt, *, impl: str, chunk: int):
    """Mamba's scan (layers/ssm/mamba.py) with the length sharded."""
    act = self.spec((axes.BATCH, axes.LENGTH, axes.MLP), x_bte.shape)
    self.length_sharded(act, x_bte.shape)
    # B and C keep the state axis whole: the scan contracts it locally (C_t . h_t), with no psum.
    state = self.spec((axes.BATCH, axes.LENGTH, None), b_bts.shape)
    return sp_selective_scan(x_bte, delta_bte, a_es, b_bts, c_bts, reset_bt, mesh=self.mesh, act_spec=act,
                             state_spec=state, tok_spec=P(act[0], act[1]),
                             a_spec=self.spec((axes.MLP, None), a_es.shape), impl=impl, chunk=chunk)

  def ssd(self, x_bthp, dt_bth, a_h, b_btgn, c_btgn, reset_bt, *, impl: str, chunk: int):
    """Mamba-2's scan (layers/ssm/mamba2.py) with the length sharded. Where the heads are split
    (tensor parallelism) and the groups of B, C cannot follow them, B and C are repeated to one
    group per head first, so that each device's heads find their group locally."""
    x_spec = self.spec((axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM), x_bthp.shape)
    self.length_sharded(x_spec, x_bthp.shape)
    h, g = x_bthp.shape[2], b_btgn.shape[2]
    if x_spec[2] is not None and g > 1:
      b_btgn, c_btgn = (jnp.repeat(v, h // g, axis=2) for v in (b_btgn, c_btgn))
      g = h
    # The state axis stays whole (contracted locally, as in `selective_scan` above).
    bc_spec = self.spec((axes.BATCH, axes.LENGTH, axes.HEADS if g == h else None, None), b_btgn.shape)
    return sp_ssd(x_bthp, dt_bth, a_h, b_btgn, c_btgn, reset_bt, mesh=self.mesh, x_spec=x_spec,
                  dt_spec=P(*x_spec[:3]), a_spec=P(x_spec[2]), bc_spec=bc_spec, tok_spec=P(x_spec[0], x_spec[1]),
                  impl=impl, chunk=chunk)
