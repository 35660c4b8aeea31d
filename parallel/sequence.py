"""Sequence (context) parallelism for attention: ring, all-to-all (Ulysses) and all-gather.

Activations arrive sharded along the length over the `sequence` mesh axis. Each
strategy is a `shard_map` over the whole mesh; per-device shapes below use
n = mesh.shape["sequence"], t = T / n, b = B / (data x fsdp), h_n = N / tensor.

* ring: each device keeps its queries [b, t, h_n, H] and passes its key/value chunk
  around the ring with `ppermute`, merging partial (out, lse) results with the online-
  softmax rule; no device ever holds more than one visiting K/V chunk, so memory is
  O(T/n). The backward pass is a custom VJP: K/V travel the ring again together with
  their dK/dV accumulators, which arrive back at their owner after n hops. The inner
  computation is `layers.attention.flash` (same block kernel, same block skipping), or
  with `model.attention_impl=pallas` the fused kernels of `kernels/flash_pallas.py`
  (masking by the true positions, skipping empty tiles at run time).
  Causal load balance comes from the data layout, not from here: with
  `parallel.load_balance=true` the pipeline stores each row in zigzag order (chunk i
  and 2n-1-i on device i) and passes the true token positions as `index`, which every
  attention path uses for causal masking.
* all_to_all: [b, t, N/tensor, H] -> all-to-all -> [b, T, N/(tensor n), H], any
  single-device attention on full-length heads, and back. Needs heads divisible by n.
* scan (recurrent mixers: linear attention, SSMs): the length stays sharded, each device
  scans its chunk from a zero state and the chunk states are combined across devices
  (parallel/scan.py); nothing O(T) moves except the [b, T] segment ids.
* all_gather: keys/values (and their segment ids and positions) all-gathered along the
  sequence, [b, t, K, H] -> [b, T, K, H]; queries stay local. Simple, O(T) K/V per device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from layers import axes
from layers.attention.flash import (chunk_grad_accumulators, flash_accumulate, flash_chunk_grads, flash_finish,
                                    merge_partials, unblock_chunk_grads)
from parallel import mesh as mesh_lib

STRATEGIES = ("auto", "ring", "all_to_all", "all_gather", "scan")
AXIS = "sequence"


class SequenceParallelError(ValueError):
  """A mixer/strategy/mesh combination that cannot work (a user mistake)."""


# -- ring -----------------------------------------------------------------------------------


def _ring_perm(n):
  return [(i, (i + 1) % n) for i in range(n)]


def _chunk_grads(impl, q, k, qseg, qidx, o, lse, d_out, causal, bq, bk):
  """(init, add, finish) of the ring backward's fp32 (dq, dk, dv) accumulators.

  add(kv, acc) adds the gradient contributions of the visiting chunk kv = (k, v, kseg, kidx)
  given the final out/lse. The pure-JAX path keeps the accumulators in the blocks' own
  layout and adds into them inside its block loops (no per-step contribution arrays, no
  layout copies); the Pallas path adds the kernels' per-chunk results.
  """
  t, s = q.shape[1], k.shape[1]
  if impl == "pallas":
    from kernels.flash_pallas import flash_chunk_grads_pallas

    def add(kv, acc):
      dq, dk, dv = flash_chunk_grads_pallas(q, kv[0], kv[1], qseg, kv[2], qidx, kv[3], o, lse, d_out, causal=causal)
      return acc[0] + dq, acc[1] + dk.astype(jnp.float32), acc[2] + dv.astype(jnp.float32)

    init = lambda: tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, k))
    return init, add, lambda acc: acc
  init = lambda: chunk_grad_accumulators(q.shape, k.shape, block_q=bq, block_k=bk)
  add = lambda kv, acc: flash_chunk_grads(q, kv[0], kv[1], qseg, kv[2], qidx, kv[3], o, lse, d_out, causal=causal,
                                          block_q=bq, block_k=bk, acc=acc)
  return init, add, lambda acc: unblock_chunk_grads(acc, t, s)


def _ring_forward(q, k, v, qseg, kseg, qidx, kidx, causal, bq, bk, n, impl):
  """(out fp32, lse) of the local queries against every K/V chunk, the chunks visiting in turn.

  The pure-JAX path folds each visiting chunk into one running online-softmax state (blocked
  (o, m, l), `flash_accumulate`), so no per-chunk partial or merged copy exists; the Pallas
  kernels return normalised partials, merged with the (out, lse) rule."""
  if impl == "pallas":
    from kernels.flash_pallas import flash_attention_pallas_lse
    part = lambda kv: flash_attention_pallas_lse(q, kv[0], kv[1], qseg, kv[2], causal=causal, q_index=qidx,
                                                 kv_index=kv[3], out_dtype=jnp.float32)
    add = lambda kv, acc: part(kv) if acc is None else merge_partials(*acc, *part(kv))
    finish = lambda acc: acc
  else:
    add = lambda kv, acc: flash_accumulate(q, kv[0], kv[1], qseg, kv[2], qidx, kv[3], acc, causal=causal,
                                           block_q=bq, block_k=bk)
    finish = lambda acc: flash_finish(acc, q.shape[1], q.shape[2])
  acc = add((k, v, kseg, kidx), None)  # the device's own chunk first
  if n > 1:
    def step(carry, _):
      acc, kv = carry
      # [b, t, K, H] x2 and [b, t] x2: the visiting chunk moves one device along the ring.
      kv = tuple(jax.lax.ppermute(x, AXIS, _ring_perm(n)) for x in kv)
      return (add(kv, acc), kv), None

    (acc, _), _ = jax.lax.scan(step, (acc, (k, v, kseg, kidx)), None, length=n - 1)
  return finish(acc)


def _ring_bwd(causal, bq, bk, n, impl, res, d_out):
  q, k, v, qseg, kseg, qidx, kidx, o, lse = res
  init, add, finish = _chunk_grads(impl, q, k, qseg, qidx, o, lse, d_out, causal, bq, bk)
  # Zero accumulators made from the forward's lse: zeros that depend on nothing may be created
  # at the top of the program and held through the forward ring (XLA:CPU does so; it drops
  # optimization barriers, which is why this is arithmetic: min(|x|, 0) = 0 for every x but NaN).
  zero = jnp.minimum(jnp.abs(lse.reshape(-1)[0].astype(jnp.float32)), 0.0)
  dq, dk, dv = add((k, v, kseg, kidx), jax.tree.map(lambda a: jnp.broadcast_to(zero, a.shape),
                                                    jax.eval_shape(init)))

  def step(carry, _):
    dq, kv, dkv = carry
    # The chunk and its dK/dV accumulators travel together ([b, t, K, H] each, the latter
    # fp32, in the accumulators' layout); dq stays.
    kv = tuple(jax.lax.ppermute(x, AXIS, _ring_perm(n)) for x in kv)
    dkv = tuple(jax.lax.ppermute(x, AXIS, _ring_perm(n)) for x in dkv)
    dq, dk, dv = add(kv, (dq, *dkv))
    return (dq, kv, (dk, dv)), None

  if n > 1:
    (dq, _, (dk, dv)), _ = jax.lax.scan(step, (dq, (k, v, kseg, kidx), (dk, dv)), None, length=n - 1)
    dk, dv = (jax.lax.ppermute(x, AXIS, _ring_perm(n)) for x in (dk, dv))  # last hop: back to the owner
  dq, dk, dv = finish((dq, dk, dv))
  zero = lambda x: jnp.zeros(x.shape, jax.dtypes.float0)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero(qseg), zero(kseg), zero(qidx),
          zero(kidx))


# -- the strategy object installed while tracing the model -----------------------------------


class SequenceParallel:
  """Runs an attention mixer's computation under one sequence-parallel strategy."""

  def __init__(self, mesh: Mesh, rules, strategy: str):
    if strategy not in STRATEGIES:
      raise SequenceParallelError(f"parallel.sequence_strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
    self.mesh, self.rules, self.strategy = mesh, rules, strategy
    self.n = mesh.shape[AXIS]

  def _specs(self, q, k):
    spec = lambda logical, shape: mesh_lib.logical_to_spec(logical, shape, self.mesh, self.rules)
    q_spec = spec((axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM), q.shape)
    kv_spec = spec((axes.BATCH, axes.LENGTH, axes.KV_HEADS, axes.HEAD_DIM), k.shape)
    tok_spec = P(q_spec[0], q_spec[1])
    if q_spec[1] != AXIS:
      raise SequenceParallelError(f"sequence parallelism needs the length axis sharded over 'sequence' "
                                  f"(mesh.rules maps length to {q_spec[1]!r}, T={q.shape[1]}, n={self.n})")
    return q_spec, kv_spec, tok_spec

  def attention(self, local_fn, q_btnh, k_btkh, v_btkh, segment_ids, index, *, causal: bool, block_q: int = 128,
                block_k: int = 128, impl: str = "flash"):
    """`local_fn(q, k, v, q_seg, kv_seg, q_idx, kv_idx) -> out` is the mixer's single-device
    computation (used by all_to_all and all_gather). Ring runs the flash blocks: the fused
    Pallas kernels when `impl="pallas"`, else the pure-JAX ones (`block_q`, `block_k`)."""
    n_heads, kv_heads = q_btnh.shape[2], k_btkh.shape[2]
    q_spec, kv_spec, tok_spec = self._specs(q_btnh, k_btkh)
    tp = lambda spec, heads: heads // (self.mesh.shape[spec[2]] if spec[2] else 1)  # heads per device
    if self.strategy == "all_to_all" and tp(q_spec, n_heads) % self.n:
      raise SequenceParallelError(
          f"all_to_all sequence parallelism splits heads over mesh.sequence={self.n}, but each device has "
          f"{tp(q_spec, n_heads)} query heads; use model.num_heads divisible by {self.n} x mesh.tensor or "
          f"parallel.sequence_strategy=ring")
    # K/V heads that cannot be split like the query heads: give each query head its own
    # copy of its kv head (memory of MHA, same math).
    if kv_spec[2] != q_spec[2] or (self.strategy == "all_to_all" and tp(kv_spec, kv_heads) % self.n):
      k_btkh = jnp.repeat(k_btkh, n_heads // kv_heads, axis=2)
      v_btkh = jnp.repeat(v_btkh, n_heads // kv_heads, axis=2)
      kv_spec = q_spec
    if self.strategy == "ring":
      return self._ring(q_btnh, k_btkh, v_btkh, segment_ids.astype(jnp.int32), index.astype(jnp.int32),
                        (q_spec, kv_spec, tok_spec), causal=causal, bq=block_q, bk=block_k,
                        impl="pallas" if impl == "pallas" else "flash")
    if self.strategy == "all_to_all":
      body = functools.partial(self._all_to_all_body, local_fn=local_fn)
    elif self.strategy == "all_gather":
      body = functools.partial(self._all_gather_body, local_fn=local_fn)
    else:
      raise SequenceParallelError(f"strategy {self.strategy!r} has no explicit attention path")
    fn = jax.shard_map(body, mesh=self.mesh, in_specs=(q_spec, kv_spec, kv_spec, tok_spec, tok_spec),
                       out_specs=q_spec, check_vma=False)
    return fn(q_btnh, k_btkh, v_btkh, segment_ids.astype(jnp.int32), index.astype(jnp.int32))

  def linear_attention(self, phi_q, phi_k, v, segment_ids, *, causal: bool, normalize: bool, eps: float,
                       chunk: int):
    """Linear attention (layers/linear/core.py) under the "scan" strategy: the length stays
    sharded and chunk states are combined across devices (parallel/scan.py)."""
    from parallel.scan import sp_linear_attention
    if self.strategy != "scan":
      raise SequenceParallelError(f"linear attention has no {self.strategy!r} path here")
    qk_spec, _, tok_spec = self._specs(phi_q, phi_k)
    v_spec, _, _ = self._specs(v, v)
    return sp_linear_attention(phi_q, phi_k, v, segment_ids, mesh=self.mesh, qk_spec=qk_spec, v_spec=v_spec,
                               tok_spec=tok_spec, causal=causal, normalize=normalize, eps=eps, chunk=chunk)

  def selective_scan(self, x_bte, delta_bte, a_es, b_bts, c_bts, reset_bt, *, impl: str, chunk: int):
    """Mamba's scan (layers/ssm/mamba.py) under the "scan" strategy (parallel/scan.py)."""
    from parallel.scan import sp_selective_scan
    if self.strategy != "scan":
      raise SequenceParallelError(f"the selective scan has no {self.strategy!r} path here")
    spec = lambda logical, shape: mesh_lib.logical_to_spec(logical, shape, self.mesh, self.rules)
    act = spec((axes.BATCH, axes.LENGTH, axes.MLP), x_bte.shape)
    if act[1] != AXIS:
      raise SequenceParallelError(f"sequence parallelism needs the length axis sharded over 'sequence' "
                                  f"(mesh.rules maps length to {act[1]!r})")
    state = spec((axes.BATCH, axes.LENGTH, axes.STATE), b_bts.shape)
    return sp_selective_scan(x_bte, delta_bte, a_es, b_bts, c_bts, reset_bt, mesh=self.mesh, act_spec=act,
                             state_spec=state, tok_spec=P(act[0], act[1]),
                             a_spec=spec((axes.MLP, axes.STATE), a_es.shape), impl=impl, chunk=chunk)

  def _ring(self, q, k, v, seg, idx, specs, *, causal, bq, bk, impl):
    """Ring attention with its custom VJP outside the shard_maps: a forward shard_map (out and
    lse) and a backward shard_map (dq, dk, dv around the ring). Differentiating *through* a
    shard_map instead would make JAX sum the input cotangents over every mesh axis the inputs
    are not split along (an all-reduce, and its buffers, per gradient even for axes of size 1)."""
    q_spec, kv_spec, tok_spec = specs
    lse_spec = P(*q_spec[:3])  # [b, t, N]
    n = self.n
    smap = lambda f, ins, outs: jax.shard_map(f, mesh=self.mesh, in_specs=ins, out_specs=outs, check_vma=False)

    def forward_local(q, k, v, seg, idx):
      o, lse = _ring_forward(q, k, v, seg, seg, idx, idx, causal, bq, bk, n, impl)
      return o.astype(q.dtype), lse

    def backward_local(q, k, v, seg, idx, o, lse, d_out):
      return _ring_bwd(causal, bq, bk, n, impl, (q, k, v, seg, seg, idx, idx, o, lse), d_out)[:3]

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
    return ring(q, k, v, seg, idx)

  def _all_to_all_body(self, q, k, v, seg, idx, *, local_fn):
    # [b, t, h, H] -> [b, T, h/n, H]: split heads across the sequence group, gather length.
    to_heads = lambda x: jax.lax.all_to_all(x, AXIS, split_axis=2, concat_axis=1, tiled=True)
    # [b, t] -> [b, T]: every device needs the whole row's segment ids and positions.
    full = lambda x: jax.lax.all_gather(x, AXIS, axis=1, tiled=True)
    seg_all, idx_all = full(seg), full(idx)
    out = local_fn(to_heads(q), to_heads(k), to_heads(v), seg_all, seg_all, idx_all, idx_all)
    # [b, T, h/n, H] -> [b, t, h, H]
    return jax.lax.all_to_all(out, AXIS, split_axis=1, concat_axis=2, tiled=True)

  def _all_gather_body(self, q, k, v, seg, idx, *, local_fn):
    # [b, t, K, H] -> [b, T, K, H] for keys and values; queries stay [b, t, h, H].
    full = lambda x: jax.lax.all_gather(x, AXIS, axis=1, tiled=True)
    return local_fn(q, full(k), full(v), seg, full(seg), idx, full(idx))


def zigzag_permutation(length: int, n: int):
  """Storage order for causal load balance: device i holds chunks i and 2n-1-i of 2n.

  Returns `perm` with stored[j] = original[perm[j]] (so `perm` is also the true position
  of each stored token, the `index` attention masks by).
  """
  import numpy as np
  if length % (2 * n):
    raise SequenceParallelError(f"load-balanced (zigzag) sequence parallelism needs task.seq_len={length} "
                                f"divisible by 2 x mesh.sequence = {2 * n}")
  c = length // (2 * n)
  chunks = np.arange(length).reshape(2 * n, c)
  order = [j for i in range(n) for j in (i, 2 * n - 1 - i)]
  return chunks[order].reshape(-1)
