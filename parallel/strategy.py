"""What every sequence-parallel strategy shares: the base class, the capabilities a strategy
needs from a mixer, the shardings it reads, and the halo exchange any strategy offers.

A strategy runs one mixer's computation with activations sharded along the length over the
`sequence` mesh axis. It declares the one capability it needs (`Strategy.needs`); a mixer
declares the capabilities it has (`Mixer.SEQUENCE_CAPABILITIES`, names from
`layers.mixer_base`), never strategy names:

- `attention`: an exact softmax-attention core, attention(q, k, v, segment ids, positions),
  that can be split over key chunks and merged with the online-softmax rule (ring, all-gather);
- `heads`: a computation independent per head given whole rows (all-to-all);
- `summary`: a recurrence whose chunk state is an associative summary (the parallel scan);
- `halo`: a computation that reads only the k tokens around each token (a convolution).

Per-device shapes: n = mesh.shape["sequence"], t = T / n, b = B / (data x fsdp).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from layers import axes
from parallel import mesh as mesh_lib

AXIS = "sequence"


class SequenceParallelError(ValueError):
  """A mixer/strategy/mesh combination that cannot work (a user mistake)."""


class Strategy:
  """A sequence-parallel strategy bound to a mesh. Subclasses set `name`, `needs` and `doc`, and
  implement the operation of their capability."""

  name = ""
  needs = ""  # the mixer capability this strategy uses ("" for none)
  doc = ""
  # Taken for a mixer that has `needs` when the configured strategy does not apply to it:
  # only for strategies that are exact and cost no more than the compiler's own sharding.
  implicit = False
  # Whether causal work is balanced by storing rows in zigzag order (`parallel.load_balance`).
  zigzag = False

  def __init__(self, mesh: Mesh, rules):
    self.mesh, self.rules = mesh, rules
    self.n = mesh.shape[AXIS]

  def spec(self, logical, shape) -> P:
    return mesh_lib.logical_to_spec(logical, shape, self.mesh, self.rules)

  def length_sharded(self, spec: P, shape) -> None:
    if spec[1] != AXIS:
      raise SequenceParallelError(f"sequence parallelism needs the length axis sharded over 'sequence' "
                                  f"(mesh.rules maps length to {spec[1]!r}, T={shape[1]}, n={self.n})")

  def attention_specs(self, q, k):
    """(q, k/v, [b, t] token) PartitionSpecs of an attention call."""
    q_spec = self.spec((axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM), q.shape)
    kv_spec = self.spec((axes.BATCH, axes.LENGTH, axes.KV_HEADS, axes.HEAD_DIM), k.shape)
    self.length_sharded(q_spec, q.shape)
    return q_spec, kv_spec, P(q_spec[0], q_spec[1])

  def _unsupported(self, what: str):
    raise SequenceParallelError(f"parallel.sequence_strategy={self.name!r} has no path for {what}")

  # The operations; each strategy implements those of its capability.
  def attention(self, local_fn, q_btnh, k_btkh, v_btkh, segment_ids, index, *, causal: bool, impl: str = "flash",
                options=None):
    """Exact attention. `local_fn(q, k, v, q_seg, kv_seg, q_idx, kv_idx) -> out` is the mixer's
    single-device computation; `impl`/`options` choose the attention backend's blocks."""
    self._unsupported("attention")

  def heads(self, local_fn, q_btnh, k_btkh, v_btkh, segment_ids, index):
    """`local_fn` (as for `attention`) on whole rows, heads split over the devices."""
    self._unsupported("per-head computations on whole rows")

  def linear_attention(self, phi_q, phi_k, v, segment_ids, *, causal: bool, normalize: bool, eps: float, chunk: int):
    self._unsupported("linear attention")

  def selective_scan(self, x_bte, delta_bte, a_es, b_bts, c_bts, reset_bt, *, impl: str, chunk: int):
    self._unsupported("the selective scan")

  def ssd(self, x_bthp, dt_bth, a_h, b_btgn, c_btgn, reset_bt, *, impl: str, chunk: int):
    self._unsupported("the SSD scan")

  def halo(self, fn: Callable, x, segment_ids, *params, left: int, right: int, logical: tuple):
    """Runs `fn(x, segment_ids, *params) -> y` (y shaped like x: [B, T, ...], with [B, T] ids) on
    each device's chunk extended by the `left` tokens before it and the `right` tokens after it,
    which arrive from the neighbouring devices; returns the chunk's own rows. Exact for any `fn`
    whose output at a token reads only tokens within (left, right) of it. `params` (weights)
    enter replicated. Every strategy offers it: the length is sharded under all of them.
    `logical` names x's axes."""
    # Batch and length stay split; channels enter whole (the weights in `params` are whole too).
    full = self.spec(logical, x.shape)
    self.length_sharded(full, x.shape)
    x_spec = P(full[0], full[1], *([None] * (x.ndim - 2)))
    t = x.shape[1] // self.n
    if max(left, right) > t:
      raise SequenceParallelError(f"a halo of {max(left, right)} tokens is longer than one device's {t} tokens "
                                  f"(T={x.shape[1]}, mesh.sequence={self.n}); use a shorter kernel or fewer devices")
    n = self.n

    def body(x, seg, *params):
      # Non-cyclic shifts: the first device receives zeros from the left (segment id 0 =
      # padding, which every tap ignores), the last from the right.
      from_left = lambda a: jax.lax.ppermute(a[:, a.shape[1] - left:], AXIS, [(i, i + 1) for i in range(n - 1)])
      from_right = lambda a: jax.lax.ppermute(a[:, :right], AXIS, [(i + 1, i) for i in range(n - 1)])
      # [b, t, ...] -> [b, left + t + right, ...]
      parts = lambda a: ([from_left(a)] if left else []) + [a] + ([from_right(a)] if right else [])
      y = fn(jnp.concatenate(parts(x), axis=1), jnp.concatenate(parts(seg), axis=1), *params)
      return y[:, left:left + x.shape[1]]

    tok = P(x_spec[0], x_spec[1])
    return jax.shard_map(body, mesh=self.mesh, in_specs=(x_spec, tok) + (P(),) * len(params), out_specs=x_spec,
                         check_vma=False)(x, jnp.asarray(segment_ids, jnp.int32), *params)
