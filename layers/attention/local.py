"""Sliding-window (`local`) and BigBird (`bigbird`) attention on the block-sparse engine
(docs/papers.md#local, #bigbird).

`local`: token i sees key j iff |i - j| <= w/2 (bidirectional) or 0 <= i - j < w
(causal), within its own segment. Queries are cut into blocks of `block` rows; each
block visits itself and the neighbouring blocks that the window can reach, and the
band is applied token by token inside them: O(T * w) time and memory, never T x T.

`bigbird` (ITC): blocks of `block` tokens. Each query block attends to 3 sliding
blocks (itself and its two neighbours), the g global blocks (the first ceil(g/2) and
the last floor(g/2)), and r random blocks, fixed per layer and head from (`seed`,
layer index) and drawn among the blocks not already listed. Global blocks attend to
every block (computed densely for those g * block query rows with
`flash_attention_lse`). Causal: the same pattern intersected with j <= i (random
blocks are then drawn among earlier blocks).

Reference twins: `reference_local_attention` and `reference_bigbird_attention` build
the explicit [T, T] masks from the rules above and call `kernels.reference.reference_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.reference import make_mask, reference_attention
from layers.attention import ops
from layers.attention.block_sparse import (band_mask, block_sparse_attention, check_storage_order, num_blocks,
                                           pack_rows, per_head_reference_attention, stack_heads)
from layers.attention.decode import PatternCacheMixin, block_mask_rows
from layers.attention.exact import Attention
from layers.mixer_base import MixContext, MixerSpec


def window_band(window: int, causal: bool) -> tuple[int, int]:
  """(before, after): causal 0 <= i-j < w; bidirectional |i-j| <= w // 2."""
  return (window - 1, 0) if causal else (window // 2, window // 2)


def local_block_table(nb: int, block: int, band: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Each query block lists itself and the neighbour blocks the band can reach."""
  before, after = -(-band[0] // block), -(-band[1] // block)
  rows = [[j for j in range(i - before, i + after + 1) if 0 <= j < nb] for i in range(nb)]
  return stack_heads([pack_rows(rows)])


def reference_local_attention(q_btnh, k_btkh, v_btkh, segment_ids, *, window: int, causal: bool) -> jax.Array:
  t = q_btnh.shape[1]
  index = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
  mask = make_mask(segment_ids, segment_ids, index, index, causal) & band_mask(t, window_band(window, causal))[None]
  return reference_attention(q_btnh, k_btkh, v_btkh, mask)


class LocalAttention(Attention):
  """Sliding-window attention (config group `model.local`).

  Options: `window` (w, default 128): bidirectional |i-j| <= w/2, causal 0 <= i-j < w;
  `block` (query/key block rows; 0 = w // 2, so each block visits 3 blocks: cost
  about 1.5 * T * w scores). Causal models decode with a ring buffer of the last w keys
  and values per row (slot = position mod w), so the cache is O(w), not O(T).
  """

  # Blocks are contiguous runs of stored tokens: only compiler-propagated sharding ("auto") of
  # the length axis; Attention's explicit ring / all-to-all / all-gather paths do not apply.
  SEQUENCE_CAPABILITIES = frozenset()  # no explicit strategy: the compiler's sharding only

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.window = int(spec.option("window", 128))
    self.block = int(spec.option("block", 0)) or max(1, self.window // 2)
    if self.window < 1 or self.block < 1:
      raise ValueError(f"model.local.window={self.window} and model.local.block={self.block} must be positive")

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    del max_len  # the cache is the window, whatever the length
    if not self.spec.causal:
      raise ValueError("local attention decodes only causally (this model is bidirectional)")
    kv, h, w = self.spec.num_kv_heads, self.spec.head_dim, self.window
    self.cached_key = nnx.Cache(jnp.zeros((batch, w, kv, h), dtype))
    self.cached_value = nnx.Cache(jnp.zeros((batch, w, kv, h), dtype))
    self.cached_segment_ids = nnx.Cache(jnp.zeros((batch, w), jnp.int32))
    self.cached_positions = nnx.Cache(jnp.full((batch, w), -1, jnp.int32))  # -1: empty slot

  def attend_cached(self, q_btnh, k_btkh, v_btkh, ctx: MixContext) -> jax.Array:
    """New tokens against the ring buffer plus themselves; then the buffer keeps the last w.

    The window is measured in per-segment positions, which equal storage distances in a
    full forward (segments are contiguous) and stay right when a padded prompt leaves a
    gap in the cache.
    """
    if getattr(self, "cached_positions", None) is None:
      raise ValueError("decode=True needs init_cache(batch, max_len, dtype) first")
    b, t = ctx.segment_ids.shape
    w = self.window
    seg, pos = ctx.segment_ids.astype(jnp.int32), ctx.positions.astype(jnp.int32)
    keys = jnp.concatenate([self.cached_key[...], k_btkh.astype(self.cached_key.dtype)], axis=1)
    values = jnp.concatenate([self.cached_value[...], v_btkh.astype(self.cached_value.dtype)], axis=1)
    kseg = jnp.concatenate([self.cached_segment_ids[...], seg], axis=1)
    kpos = jnp.concatenate([self.cached_positions[...], pos], axis=1)
    order = jnp.concatenate([jnp.full((w,), -1, jnp.int32), jnp.arange(t, dtype=jnp.int32)])  # cached: earlier
    mask = ((seg[:, :, None] == kseg[:, None, :]) & (seg[:, :, None] != 0) & (kpos[:, None, :] >= 0)
            & (order[None, None, :] <= jnp.arange(t)[None, :, None])
            & (pos[:, :, None] - kpos[:, None, :] < w))
    out = reference_attention(q_btnh, keys, values, mask)
    # Ring update: real new tokens go to slot position mod w; the latest writer of a slot wins
    # (padding is never written, so a row's last w real tokens survive a padded prompt).
    writes = (pos[:, :, None] % w == jnp.arange(w)[None, None, :]) & (seg[:, :, None] != 0)  # [b, t, w]
    writer = jnp.argmax(writes * (1 + jnp.arange(t))[None, :, None], axis=1)  # [b, w]: last writer
    written = jnp.any(writes, axis=1)
    pick = lambda new, old: jnp.where(written.reshape(written.shape + (1,) * (old.ndim - 2)),
                                      jnp.take_along_axis(new, writer.reshape(
                                          writer.shape + (1,) * (old.ndim - 2)), axis=1).astype(old.dtype), old)
    self.cached_key[...] = pick(k_btkh, self.cached_key[...])
    self.cached_value[...] = pick(v_btkh, self.cached_value[...])
    self.cached_segment_ids[...] = pick(seg, self.cached_segment_ids[...])
    self.cached_positions[...] = pick(pos, self.cached_positions[...])
    return out

  def attend(self, q_btnh, k_btkh, v_btkh, ctx: MixContext) -> jax.Array:
    check_storage_order(ctx, "local")
    band = window_band(self.window, self.spec.causal)
    blocks, valid = local_block_table(num_blocks(q_btnh.shape[1], self.block), self.block, band)
    return block_sparse_attention(q_btnh, k_btkh, v_btkh, ctx.segment_ids, blocks, valid, block=self.block,
                                  causal=self.spec.causal, band=band, impl=self.spec.attention_impl)


# ----------------------------------------------------------------------------------------------------------------
# BigBird
# ----------------------------------------------------------------------------------------------------------------


def global_blocks(nb: int, num_global: int) -> list[int]:
  """The first ceil(g/2) and the last floor(g/2) blocks (BigBird ITC: first and last for g = 2)."""
  first = list(range(min(nb, -(-num_global // 2))))
  last = list(range(max(0, nb - num_global // 2), nb))
  return sorted(set(first + last))


def sliding_blocks(i: int, nb: int, causal: bool) -> list[int]:
  return [j for j in (i - 1, i, i + 1) if 0 <= j < nb and (not causal or j <= i)]


def bigbird_random_blocks(nb: int, num_heads: int, *, num_global: int, num_random: int, seed: int,
                          layer_index: int, causal: bool) -> list[list[list[int]]]:
  """[head][query block] -> its random key blocks: distinct, outside its sliding and global
  blocks (causal: earlier blocks only), drawn from a generator seeded by (seed, layer)."""
  rng = np.random.default_rng((seed, layer_index))
  glob = set(global_blocks(nb, num_global))
  out = []
  for _ in range(num_heads):
    rows = []
    for i in range(nb):
      taken = glob | set(sliding_blocks(i, nb, False))
      cand = [j for j in range(nb) if j not in taken and (not causal or j < i)]
      pick = rng.choice(cand, size=min(num_random, len(cand)), replace=False) if cand and i not in glob else []
      rows.append(sorted(int(j) for j in pick))
    out.append(rows)
  return out


def bigbird_block_table(nb: int, num_heads: int, *, num_global: int, num_random: int, seed: int, layer_index: int,
                        causal: bool) -> tuple[np.ndarray, np.ndarray]:
  """(kv_blocks, kv_valid) [1, N, nb, 3 + g + r] of the non-global query blocks (global
  query rows list only their sliding and global blocks; their output is computed densely)."""
  glob = global_blocks(nb, num_global)
  rand = bigbird_random_blocks(nb, num_heads, num_global=num_global, num_random=num_random, seed=seed,
                               layer_index=layer_index, causal=causal)
  tables = []
  for head in range(num_heads):
    rows = []
    for i in range(nb):
      row = sliding_blocks(i, nb, causal) + [j for j in glob if (not causal or j <= i)] + rand[head][i]
      rows.append(list(dict.fromkeys(row)))  # sliding and global blocks may coincide near the ends
    tables.append(pack_rows(rows))
  return stack_heads(tables)


def bigbird_block_mask(nb: int, num_global: int, random_blocks: list[list[list[int]]]) -> np.ndarray:
  """BigBird's pattern as a block mask [N, nb, nb] from its rules (sliding, global rows and
  columns, random blocks); causality is applied token by token on top."""
  glob = np.zeros(nb, bool)
  glob[global_blocks(nb, num_global)] = True
  bi, bj = np.arange(nb)[:, None], np.arange(nb)[None, :]
  masks = []
  for rows in random_blocks:
    blocks = (np.abs(bi - bj) <= 1) | glob[:, None] | glob[None, :]
    for i, row in enumerate(rows):
      blocks[i, row] = True
    masks.append(blocks)
  return np.stack(masks)


def reference_bigbird_attention(q_btnh, k_btkh, v_btkh, segment_ids, *, block: int, num_global: int,
                                random_blocks: list[list[list[int]]], causal: bool) -> jax.Array:
  """BigBird with the explicit [N, T, T] mask built from its rules, head by head."""
  t = q_btnh.shape[1]
  index = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
  base = make_mask(segment_ids, segment_ids, index, index, causal)
  blocks = bigbird_block_mask(num_blocks(t, block), num_global, random_blocks)
  masks = np.repeat(np.repeat(blocks, block, 1), block, 2)[:, :t, :t]
  return per_head_reference_attention(q_btnh, k_btkh, v_btkh, base[:, None] & masks[None])


class BigBirdAttention(PatternCacheMixin, Attention):
  """BigBird ITC block-sparse attention (config group `model.bigbird`).

  Options: `block` (b, default 64), `num_global` (g global blocks: first ceil(g/2), last
  floor(g/2); default 2), `num_random` (r random blocks per query block and head,
  default 3), `seed` (with the layer index, fixes the random blocks; default 0).
  Cost: O(T * (3 + g + r) * b) for the ordinary rows plus O(g * b * T) for the global
  rows.

  Causal models decode (`init_cache(batch, max_len, dtype)`, then calls with ctx.decode).
  The pattern depends on the row's length (the last floor(g/2) global blocks and the
  random draws are for nb = ceil(T / b) blocks), so decoding with a cache of max_len slots
  is defined as the full causal forward over a row of max_len tokens: the pattern is built
  for ceil(max_len / b) blocks and the query at position p attends over a dense KV cache
  with that pattern's row for p (a global block's row is every earlier token). Prefill +
  token-by-token decoding equals that forward at the same positions; padding is not
  stored (see `decode.PatternCacheMixin`). Cost O(max_len) per decoded token.
  """

  LAYER_INDEXED = True  # the random blocks are drawn per layer

  # Blocks are contiguous runs of stored tokens: only compiler-propagated sharding ("auto") of
  # the length axis; Attention's explicit ring / all-to-all / all-gather paths do not apply.
  SEQUENCE_CAPABILITIES = frozenset()  # no explicit strategy: the compiler's sharding only

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.block = int(spec.option("block", 64))
    self.num_global = int(spec.option("num_global", 2))
    self.num_random = int(spec.option("num_random", 3))
    self.seed = int(spec.option("seed", 0))
    if self.block < 1 or self.num_global < 0 or self.num_random < 0:
      raise ValueError(f"model.bigbird needs block >= 1, num_global >= 0 and num_random >= 0; got block="
                       f"{self.block}, num_global={self.num_global}, num_random={self.num_random}")

  def decode_name(self) -> str:
    return "bigbird"

  def decode_pattern(self, position_bt, size: int):
    nb = num_blocks(size, self.block)
    mask = bigbird_block_mask(nb, self.num_global, self.random_blocks(nb))[None]
    return block_mask_rows(mask, position_bt, self.block, size)

  def random_blocks(self, nb: int) -> list[list[list[int]]]:
    return bigbird_random_blocks(nb, self.spec.num_heads, num_global=self.num_global, num_random=self.num_random,
                                 seed=self.seed, layer_index=self.spec.layer_index, causal=self.spec.causal)

  def attend(self, q_btnh, k_btkh, v_btkh, ctx: MixContext) -> jax.Array:
    check_storage_order(ctx, "bigbird")
    b, t = ctx.segment_ids.shape
    nb = num_blocks(t, self.block)
    blocks, valid = bigbird_block_table(nb, self.spec.num_heads, num_global=self.num_global,
                                        num_random=self.num_random, seed=self.seed,
                                        layer_index=self.spec.layer_index, causal=self.spec.causal)
    out = block_sparse_attention(q_btnh, k_btkh, v_btkh, ctx.segment_ids, blocks, valid, block=self.block,
                                 causal=self.spec.causal, impl=self.spec.attention_impl)
    rows = np.concatenate([np.arange(j * self.block, (j + 1) * self.block) for j in global_blocks(nb, self.num_global)]
                          + [np.zeros(0, np.int64)])
    rows = rows[rows < t]
    if not len(rows):
      return out
    # Global query rows see every key: dense (blockwise) attention for just those rows.
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = jnp.asarray(ctx.segment_ids)
    out_glob = ops.attention(q_btnh[:, rows], k_btkh, v_btkh, seg[:, rows], seg, index[:, rows], index,
                             causal=self.spec.causal, impl=self.spec.attention_impl,
                             options=ops.Options(block_q=self.block, block_k=self.block))
    return out.at[:, rows].set(out_glob.astype(out.dtype))
