"""All-gather sequence parallelism: keys and values (with their segment ids and positions) are
all-gathered along the sequence, queries stay local. Simple; O(T) K/V per device.

    k, v: [b, t, K, H] -> [b, T, K, H]; q stays [b, t, h, H]; the mixer's own single-device
    attention then runs on (local queries, all keys).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layers.mixer_base import ATTENTION
from parallel.ring import repeat_kv_if_needed
from parallel.strategy import AXIS, Strategy


class AllGather(Strategy):
  name = "all_gather"
  needs = ATTENTION
  doc = "keys/values all-gathered along the sequence, queries local; O(T) K/V per device"

  def attention(self, local_fn, q_btnh, k_btkh, v_btkh, segment_ids, index, *, causal, impl="flash", options=None):
    q_spec, kv_spec, tok_spec = self.attention_specs(q_btnh, k_btkh)
    k_btkh, v_btkh, kv_spec = repeat_kv_if_needed(self, q_btnh, k_btkh, v_btkh, q_spec, kv_spec)

    def body(q, k, v, seg, idx):
      # [b, t, K, H] -> [b, T, K, H] for keys and values; queries stay [b, t, h, H].
      full = lambda x: jax.lax.all_gather(x, AXIS, axis=1, tiled=True)
      return local_fn(q, full(k), full(v), seg, full(seg), idx, full(idx))

    fn = jax.shard_map(body, mesh=self.mesh, in_specs=(q_spec, kv_spec, kv_spec, tok_spec, tok_spec),
                       out_specs=q_spec, check_vma=False)
    return fn(q_btnh, k_btkh, v_btkh, segment_ids.astype(jnp.int32), index.astype(jnp.int32))
