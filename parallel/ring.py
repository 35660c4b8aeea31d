"""Ring attention: each device keeps its queries and passes its key/value chunk around the ring.

Per device: queries [b, t, h_n, H] stay; the visiting K/V chunk [b, t, K, H] (and its segment
ids and positions) moves one device along the ring with `ppermute` per step, and each chunk's
contribution is folded into the running result by the attention backend
(`layers.attention.ops`: the pure-JAX blockwise flash keeps one online-softmax state; the
Pallas kernels return normalised partials merged with the (out, lse) rule). No device ever
holds more than one visiting chunk, so memory is O(T/n). The backward pass is a custom VJP:
K/V travel the ring again together with their dK/dV accumulators, which arrive back at their
owner after n hops.

Causal load balance comes from the data layout, not from here: with
`parallel.load_balance=true` the pipeline stores each row in zigzag order (chunks i and
2n-1-i on device i) and passes the true token positions as `index`, by which every attention
backend masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from layers.attention import ops
from layers.mixer_base import ATTENTION
from parallel.strategy import AXIS, Strategy


def _ring_perm(n):
  return [(i, (i + 1) % n) for i in range(n)]


def _forward(backend, q, k, v, seg, idx, causal, options, n):
  """(out fp32, lse) of the local queries against every K/V chunk, the chunks visiting in turn."""
  add, finish = backend.ring_forward(q, seg, idx, causal=causal, options=options)
  acc = add((k, v, seg, idx), None)  # the device's own chunk first
  if n > 1:
    def step(carry, _):
      acc, kv = carry
      # [b, t, K, H] x2 and [b, t] x2: the visiting chunk moves one device along the ring.
      kv = tuple(jax.lax.ppermute(x, AXIS, _ring_perm(n)) for x in kv)
      return (add(kv, acc), kv), None

    (acc, _), _ = jax.lax.scan(step, (acc, (k, v, seg, idx)), None, length=n - 1)
  return finish(acc)


def _backward(backend, q, k, v, seg, idx, o, lse, d_out, causal, options, n):
  init, add, finish = backend.ring_backward(q, k, seg, idx, o, lse, d_out, causal=causal, options=options)
  # Zero accumulators made from the forward's lse: zeros that depend on nothing may be created
  # at the top of the program and held through the forward ring (XLA:CPU does so; it drops
  # optimization barriers, which is why this is arithmetic: min(|x|, 0) = 0 for every x but NaN).
  zero = jnp.minimum(jnp.abs(lse.reshape(-1)[0].astype(jnp.float32)), 0.0)
  dq, dk, dv = add((k, v, seg, idx), jax.tree.map(lambda a: jnp.broadcast_to(zero, a.shape), jax.eval_shape(init)))

  def step(carry, _):
    dq, kv, dkv = carry
    # The chunk and its dK/dV accumulators travel together ([b, t, K, H] each, the latter
    # fp32, in the accumulators' layout); dq stays.
    kv = tuple(jax.lax.ppermute(x, AXIS, _ring_perm(n)) for x in kv)
    dkv = tuple(jax.lax.ppermute(x, AXIS, _ring_perm(n)) for x in dkv)
    dq, dk, dv = add(kv, (dq, *dkv))
    return (dq, kv, (dk, dv)), None

  if n > 1:
    (dq, _, (dk, dv)), _ = jax.lax.scan(step, (dq, (k, v, seg, idx), (dk, dv)), None, length=n - 1)
    dk, dv = (jax.lax.ppermute(x, AXIS, _ring_perm(n)) for x in (dk, dv))  # last hop: back to the owner
  dq, dk, dv = finish((dq, dk, dv))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def repeat_kv_if_needed(strategy: Strategy, q, k, v, q_spec, kv_spec, split: int = 1):
  """K/V heads that cannot be split like the query heads (or, with `split`, into `split` groups
  per device): each query head gets its own copy of its kv head (memory of MHA, same math)."""
  heads = lambda spec, count: count // (strategy.mesh.shape[spec[2]] if spec[2] else 1)  # per device
  if kv_spec[2] != q_spec[2] or heads(kv_spec, k.shape[2]) % split:
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
    kv_spec = q_spec
  return k, v, kv_spec


class Ring(Strategy):
  name = "ring"
  needs = ATTENTION
  doc = "K/V chunks pass around the ring, partial results merged by the online softmax; O(T/n) memory"
  zigzag = True

  def attention(self, local_fn, q_btnh, k_btkh, v_btkh, segment_ids, index, *, causal, impl="flash", options=None):
    """Ring attention with its custom VJP outside the shard_maps: a forward shard_map (out and
    lse) and a backward shard_map (dq, dk, dv around the ring). Differentiating *through* a
    shard_map instead would make JAX sum the input cotangents over every mesh axis the inputs
    are not split along (an all-reduce, and its buffers, per gradient even for axes of size 1)."""
    del local_fn  # the ring splits the computation over key chunks itself
    options = options or ops.Options()
    backend = ops.backend(impl)
    q_spec, kv_spec, tok_spec = self.attention_specs(q_btnh, k_btkh)
    k_btkh, v_btkh, kv_spec = repeat_kv_if_needed(self, q_btnh, k_btkh, v_btkh, q_spec, kv_spec)
    lse_spec = P(*q_spec[:3])  # [b, t, N]
    n = self.n
    smap = lambda f, ins, outs: jax.shard_map(f, mesh=self.mesh, in_specs=ins, out_specs=outs, check_vma=False)

    def forward_local(q, k, v, seg, idx):
      o, lse = _forward(backend, q, k, v, seg, idx, causal, options, n)
      return o.astype(q.dtype), lse

    def backward_local(q, k, v, seg, idx, o, lse, d_out):
      return _backward(backend, q, k, v, seg, idx, o, lse, d_out, causal, options, n)

    forward = smap(forward_local, (q_spec, kv_spec, kv_spec, tok_spec, tok_spec), (q_spec, lse_spec))
    backward = smap(backward_local, (q_spec, kv_spec, kv_spec, tok_spec, tok_spec, q_spec, lse_spec, q_spec),
                    (q_spec, kv_spec, kv_spec))

    @jax.custom_vjp
    def ring(q, k, v, seg, idx):
      return forward(q, k, v, seg, idx)[0]

    def ring_fwd(q, k, v, seg, idx):
      o, lse = forward(q, k, v, seg, idx)
      return o, (q, k, v, seg, idx, o, lse)

    def ring_bwd(res, d_out):
      q, k, v, seg, idx, o, lse = res
      dq, dk, dv = backward(q, k, v, seg, idx, o, lse, d_out)
      zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)
      return dq, dk, dv, zero(seg), zero(idx)

    ring.defvjp(ring_fwd, ring_bwd)
    return ring(q_btnh, k_btkh, v_btkh, segment_ids.astype(jnp.int32), index.astype(jnp.int32))

