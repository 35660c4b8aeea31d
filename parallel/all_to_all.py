"""All-to-all (Ulysses) sequence parallelism: trade the length split for a head split.

    [b, t, N/tensor, H] -> all-to-all -> [b, T, N/(tensor n), H], any single-device computation
    on whole rows of its heads, and back. Needs the heads per device divisible by n.

It serves exact attention and every mixer whose computation is independent per head given
whole rows (linear attention, TransNormer's diagonal attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layers.mixer_base import HEADS
from parallel.ring import repeat_kv_if_needed
from parallel.strategy import AXIS, SequenceParallelError, Strategy


class AllToAll(Strategy):
  name = "all_to_all"
  needs = HEADS
  doc = "heads split over the sequence group, whole rows per device (needs heads divisible by mesh.sequence)"

  def heads(self, local_fn, q_btnh, k_btkh, v_btkh, segment_ids, index):
    q_spec, kv_spec, tok_spec = self.attention_specs(q_btnh, k_btkh)
    per_device = q_btnh.shape[2] // (self.mesh.shape[q_spec[2]] if q_spec[2] else 1)
    if per_device % self.n:
      raise SequenceParallelError(
          f"all_to_all sequence parallelism splits heads over mesh.sequence={self.n}, but each device has "
          f"{per_device} query heads; use model.num_heads divisible by {self.n} x mesh.tensor or "
          f"another strategy (ring for attention, scan for the kernelised family)")
    k_btkh, v_btkh, kv_spec = repeat_kv_if_needed(self, q_btnh, k_btkh, v_btkh, q_spec, kv_spec, split=self.n)

    def body(q, k, v, seg, idx):
      # [b, t, h, H] -> [b, T, h/n, H]: split heads across the sequence group, gather length.
      to_heads = lambda x: jax.lax.all_to_all(x, AXIS, split_axis=2, concat_axis=1, tiled=True)
      # [b, t] -> [b, T]: every device needs the whole row's segment ids and positions.
      full = lambda x: jax.lax.all_gather(x, AXIS, axis=1, tiled=True)
      seg_all, idx_all = full(seg), full(idx)
      out = local_fn(to_heads(q), to_heads(k), to_heads(v), seg_all, seg_all, idx_all, idx_all)
      # [b, T, h/n, H] -> [b, t, h, H]
      return jax.lax.all_to_all(out, AXIS, split_axis=1, concat_axis=2, tiled=True)

    fn = jax.shard_map(body, mesh=self.mesh, in_specs=(q_spec, kv_spec, kv_spec, tok_spec, tok_spec),
                       out_specs=q_spec, check_vma=False)
    return fn(q_btnh, k_btkh, v_btkh, segment_ids.astype(jnp.int32), index.astype(jnp.int32))

  def attention(self, local_fn, q_btnh, k_btkh, v_btkh, segment_ids, index, *, causal, impl="flash", options=None):
    return self.heads(local_fn, q_btnh, k_btkh, v_btkh, segment_ids, index)
