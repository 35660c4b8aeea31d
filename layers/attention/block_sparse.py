"""Block-sparse softmax attention: each query block attends to a listed set of key blocks.

The engine, `block_sparse_attention`, takes a block table: for every query block of
`block` rows, the M key blocks it attends to (`kv_blocks`) and which of those M entries
are real (`kv_valid`, so rows may keep different numbers of blocks). It gathers only
the listed K/V blocks and runs the online softmax of FlashAttention over them (step m
visits the m-th listed block of every query block at once), so it costs
O(T * M * block * H) FLOPs and O(T * block) working memory per step, never T x T.
Inside a visited block pair the token mask comes from segment ids (0 = padding),
absolute indices (causal) and an optional band (sliding windows).

Backward: a custom VJP in FlashAttention's style (recompute P from the saved lse,
one pass over the M entries, dK/dV scatter-added into their key blocks). Autodiff of
the loop would be O(T * M * block) too, since it stores every step's probabilities, but
the custom VJP keeps only O(T * H) residuals, so memory does not grow with M (compiled
memory against autodiff and the dense reference: BENCHMARKS.md).
The gathers and scatters are vmapped over batch and kv heads, so with those axes sharded
the step stays local (only the per-step "is any entry valid" flag is all-reduced).

On top of the engine:
* `BlockSparseAttention` (`block_sparse`): a fixed table from a config pattern
  ("local", "strided", "random", "full") or any table given programmatically.
* `XAttention` (`xattention`, docs/papers.md#xattention): a per-input table chosen by strided
  antidiagonal scoring and a cumulative-probability threshold.
`layers/attention/local.py` builds `local` (sliding window) and `bigbird` on it too.

Reference twins: `reference_block_sparse_attention` (the table expanded to an explicit
[B, N, T, T] mask, then `kernels.reference.reference_attention` head by head) and
`reference_xattention_block_mask` (XAttention's selection as plain numpy loops).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.reference import MASK_VALUE, NEG_INF, make_mask, reference_attention
from layers.attention import ops
from layers.attention.decode import PatternCacheMixin, block_mask_rows
from layers.attention.exact import Attention
from layers.attention.flash import pad_length
from layers.mixer_base import MixContext, MixerSpec

Band = tuple[int, int] | None  # (before, after): key j visible from query i only if i-before <= j <= i+after


# ----------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------


def _table(kv_blocks, kv_valid, b, n, kvh, nb):
  """[B or 1, N|K|1, C, M] -> idx, valid [B, K, G', C, M] with G' = G (per query head) or 1 (shared).

  Invalid entries point at block 0 (masked everywhere, so they read and write nothing).
  """
  kv_blocks, kv_valid = jnp.asarray(kv_blocks, jnp.int32), jnp.asarray(kv_valid, bool)
  if kv_blocks.ndim != 4 or kv_blocks.shape != kv_valid.shape:
    raise ValueError(f"kv_blocks {kv_blocks.shape} and kv_valid {kv_valid.shape} must both be [B or 1, heads, "
                     f"{nb} query blocks, M]")
  tb, tn, tc, m = kv_blocks.shape
  if tb not in (1, b) or tn not in (1, kvh, n) or tc != nb:
    raise ValueError(f"block table of shape {kv_blocks.shape} does not fit batch {b}, {n} query heads / {kvh} kv "
                     f"heads and {nb} blocks; expected [{b} or 1, {n}, {kvh} or 1, {nb}, M]")
  g = n // kvh
  if tn == n and g > 1:
    shape = (tb, kvh, g, nb, m)
  elif tn == 1:
    shape = (tb, 1, 1, nb, m)
  else:  # one table per kv head, shared by its group of query heads
    shape = (tb, kvh, 1, nb, m)
  idx = kv_blocks.reshape(shape)
  valid = kv_valid.reshape(shape) & (idx >= 0) & (idx < nb)
  full = (b, kvh, shape[2], nb, m)
  idx = jnp.broadcast_to(jnp.where(valid, idx, 0), full)
  return idx, jnp.broadcast_to(valid, full)


def _per_kv_head(fn):
  """Lifts fn(x [C, ...], im [G', C]) over the batch and kv-head axes. vmap (rather than
  broadcast index arrays) makes those axes batching dimensions of the gather/scatter, which
  the SPMD partitioner keeps local when batch or heads are sharded."""
  return jax.vmap(jax.vmap(fn))


_take = _per_kv_head(lambda x_csh, im_gc: x_csh[im_gc])  # [B, K, C, bk, H], [B, K, G', C] -> [B, K, G', C, bk, H]
_add = _per_kv_head(lambda acc_csh, im_gc, upd_gcsh: acc_csh.at[im_gc].add(upd_gcsh))


def _step_mask(qsb, ksb, im, vm, block, causal, band):
  """Visibility [B, K, G', C, R, bk] of step m's block pairs.

  qsb [B, C, R] segments of the R query rows of each block (R = block, or G * block when
  the G query heads of a kv head share the table and are stacked as rows); ksb [B, C, bk]
  key segments; im/vm [B, K, G', C] the step's key block per query block and its validity.
  """
  nb, rows = qsb.shape[1:]
  kseg = jax.vmap(lambda s_cs, im_kgc: s_cs[im_kgc])(ksb, im)  # [B, K, G', C, bk]
  qseg = qsb[:, None, None, :, :, None]  # [B, 1, 1, C, R, 1]
  mask = (qseg == kseg[..., None, :]) & (qseg > 0) & vm[..., None, None]
  if causal or band is not None:
    qpos = (jnp.arange(nb)[:, None] * block + jnp.arange(rows) % block)[:, :, None]  # [C, R, 1]
    kpos = (im[..., None] * block + jnp.arange(block))[..., None, :]  # [B, K, G', C, 1, bk]
    if causal:
      mask &= kpos <= qpos
    if band is not None:
      mask &= (kpos >= qpos - band[0]) & (kpos <= qpos + band[1])
  return mask


_S, _PV, _DKV = "bkgcrh,bkgcsh->bkgcrs", "bkgcrs,bkgcsh->bkgcrh", "bkgcrs,bkgcrh->bkgcsh"
_F32 = dict(preferred_element_type=jnp.float32)


def _forward(q, kb, vb, qsb, ksb, idx, valid, block, causal, band):
  """q [B, K, G', C, R, H], kb/vb [B, K, C, bk, H], idx/valid [B, K, G', C, M]
  -> out (fp32) like q, lse [B, K, G', C, R]."""
  scale = 1.0 / math.sqrt(q.shape[-1])

  def body(m, carry):
    im, vm = idx[..., m], valid[..., m]

    def visit(carry):
      o, mx, l = carry
      k_g, v_g = _take(kb, im), _take(vb, im)  # only the listed blocks: [B, K, G', C, bk, H]
      s = jnp.einsum(_S, q, k_g, **_F32) * scale
      mask = _step_mask(qsb, ksb, im, vm, block, causal, band)
      s = jnp.where(mask, s, MASK_VALUE)
      mx_new = jnp.maximum(mx, jnp.max(s, axis=-1))
      p = jnp.where(mask, jnp.exp(s - mx_new[..., None]), 0.0)
      corr = jnp.exp(mx - mx_new)
      l = corr * l + jnp.sum(p, axis=-1)
      o = corr[..., None] * o + jnp.einsum(_PV, p.astype(vb.dtype), v_g, **_F32)
      return o, mx_new, l

    # A step no query block uses (rows with fewer entries than M) is skipped outright.
    return jax.lax.cond(jnp.any(vm), visit, lambda c: c, carry)

  stats = q.shape[:-1]
  o0 = jnp.zeros(q.shape, jnp.float32)
  o, mx, l = jax.lax.fori_loop(0, idx.shape[-1], body,
                               (o0, jnp.full(stats, MASK_VALUE, jnp.float32), jnp.zeros(stats, jnp.float32)))
  empty = l == 0.0
  out = o / jnp.where(empty, 1.0, l)[..., None]
  lse = jnp.where(empty, NEG_INF, mx + jnp.log(jnp.where(empty, 1.0, l)))
  return out, lse


def _backward(q, kb, vb, qsb, ksb, idx, valid, out, lse, d_out, block, causal, band):
  """One pass over the M entries: P recomputed from lse; dK/dV scatter-added into their blocks."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # rowsum(dO * O)
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)

  def body(m, carry):
    im, vm = idx[..., m], valid[..., m]

    def visit(carry):
      dq, dk, dv = carry
      k_g, v_g = _take(kb, im), _take(vb, im)
      s = jnp.einsum(_S, q, k_g, **_F32) * scale
      mask = _step_mask(qsb, ksb, im, vm, block, causal, band)
      p = jnp.where(mask, jnp.exp(s - lse_safe[..., None]), 0.0)
      dp = jnp.einsum(_S, d_out, v_g, **_F32)
      ds = p * (dp - delta[..., None])
      dq = dq + jnp.einsum(_PV, ds.astype(kb.dtype), k_g, **_F32) * scale
      # Several query blocks (and, with per-head tables, several query heads) may list one key block: scatter-ADD.
      dk = _add(dk, im, jnp.einsum(_DKV, ds.astype(q.dtype), q, **_F32) * scale)
      dv = _add(dv, im, jnp.einsum(_DKV, p.astype(d_out.dtype), d_out, **_F32))
      return dq, dk, dv

    return jax.lax.cond(jnp.any(vm), visit, lambda c: c, carry)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  return jax.lax.fori_loop(0, idx.shape[-1], body, (zeros(q), zeros(kb), zeros(vb)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _engine(q, kb, vb, qsb, ksb, idx, valid, block, causal, band):
  out, _ = _forward(q, kb, vb, qsb, ksb, idx, valid, block, causal, band)
  return out.astype(q.dtype)


def _engine_fwd(q, kb, vb, qsb, ksb, idx, valid, block, causal, band):
  out, lse = _forward(q, kb, vb, qsb, ksb, idx, valid, block, causal, band)
  out = out.astype(q.dtype)
  return out, (q, kb, vb, qsb, ksb, idx, valid, out, lse)


def _engine_bwd(block, causal, band, res, d_out):
  q, kb, vb, qsb, ksb, idx, valid, out, lse = res
  dq, dk, dv = _backward(q, kb, vb, qsb, ksb, idx, valid, out, lse, d_out, block, causal, band)
  none = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  return dq.astype(q.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), none(qsb), none(ksb), none(idx), none(valid)


_engine.defvjp(_engine_fwd, _engine_bwd)


def num_blocks(length: int, block: int) -> int:
  return -(-length // block)


def block_sparse_attention(q_btnh, k_bskh, v_bskh, segment_ids, kv_blocks, kv_valid, *, block: int, causal: bool,
                           band: Band = None, impl: str = "flash") -> jax.Array:
  """Softmax attention of each query block over only the key blocks its table row lists.

  q [B, T, N, H]; k, v [B, T, K, H] with N a multiple of K (grouped-query: query head n
  reads kv head n // (N/K) straight from k/v, no copies of K/V per query head).
  segment_ids [B, T] (0 = padding; tokens see only their own segment).
  kv_blocks int [B or 1, N or K or 1, ceil(T/block), M]: for every query block, the key
  blocks it attends to; kv_valid bool, same shape, marks the real entries. The valid
  entries of a row must be distinct (a repeated block would be counted twice).
  causal: key index <= query index inside the visited blocks; band (before, after):
  additionally i - before <= j <= i + after. Queries that see no key give zeros.
  Lengths need not be multiples of `block` (padded internally with segment id 0).
  impl="pallas" runs fused kernels with the same contract: on a TPU those of
  `kernels/block_sparse_tpu.py` (Mosaic) when `block` is a multiple of 8, elsewhere those of
  `kernels/block_sparse_pallas.py` (Triton; interpret mode on CPU) when `block` is a power of
  two >= 16; otherwise, and for any other impl, this pure-JAX engine.
  """
  kernel = ops.block_sparse_kernel(impl, block)
  if kernel is not None:
    return kernel(q_btnh, k_bskh, v_bskh, segment_ids, kv_blocks, kv_valid, block=block, causal=causal, band=band)
  b, t, n, h = q_btnh.shape
  kvh = k_bskh.shape[2]
  if n % kvh:
    raise ValueError(f"num_heads={n} is not a multiple of num_kv_heads={kvh}")
  if k_bskh.shape[1] != t:
    raise ValueError(f"block-sparse attention is self-attention: {t} queries but {k_bskh.shape[1]} keys")
  g, nb = n // kvh, num_blocks(t, block)
  tp = nb * block
  idx, valid = _table(kv_blocks, kv_valid, b, n, kvh, nb)
  seg = pad_length(jnp.asarray(segment_ids, jnp.int32), tp)
  sb = seg.reshape(b, nb, block)
  q = pad_length(q_btnh, tp).reshape(b, nb, block, kvh, g, h)
  if idx.shape[2] == g:  # a table per query head: [B, K, G, C, block, H]
    q, qsb = q.transpose(0, 3, 4, 1, 2, 5), sb
  else:  # the group's query heads share the table: stack them as rows, [B, K, 1, C, G * block, H]
    q, qsb = q.transpose(0, 3, 1, 4, 2, 5).reshape(b, kvh, 1, nb, g * block, h), jnp.tile(sb, (1, 1, g))
  kb = pad_length(k_bskh, tp).reshape(b, nb, block, kvh, h).transpose(0, 3, 1, 2, 4)
  vb = pad_length(v_bskh, tp).reshape(b, nb, block, kvh, h).transpose(0, 3, 1, 2, 4)
  out = _engine(q, kb, vb, qsb, sb, idx, valid, block, causal, None if band is None else tuple(band))
  if idx.shape[2] == g:
    out = out.transpose(0, 3, 4, 1, 2, 5)
  else:
    out = out.reshape(b, kvh, nb, g, block, h).transpose(0, 2, 4, 1, 3, 5)
  return out.reshape(b, tp, n, h)[:, :t]


# ----------------------------------------------------------------------------------------------------------------
# The dense reference twin
# ----------------------------------------------------------------------------------------------------------------


def block_table_mask(kv_blocks, kv_valid, num_blocks_: int) -> jax.Array:
  """The set a table describes, as a boolean block mask [B or 1, heads, C, C]."""
  kv_blocks = jnp.asarray(kv_blocks)
  hit = (kv_blocks[..., None] == jnp.arange(num_blocks_)) & jnp.asarray(kv_valid, bool)[..., None]
  return jnp.any(hit, axis=-2)


def band_mask(t: int, band: Band) -> np.ndarray:
  """[T, T] boolean: i - before <= j <= i + after."""
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  return (j >= i - band[0]) & (j <= i + band[1])


def reference_block_sparse_attention(q_btnh, k_bskh, v_bskh, segment_ids, kv_blocks, kv_valid, *, block: int,
                                     causal: bool, band: Band = None) -> jax.Array:
  """`block_sparse_attention` as an explicit [B, N, T, T] mask and `kernels.reference.reference_attention` per head."""
  b, t, n, h = q_btnh.shape
  kvh = k_bskh.shape[2]
  g, nb = n // kvh, num_blocks(t, block)
  blocks = block_table_mask(kv_blocks, kv_valid, nb)  # [B?, N?, C, C]
  tokens = jnp.repeat(jnp.repeat(blocks, block, axis=-2), block, axis=-1)[..., :t, :t]
  tokens = jnp.broadcast_to(tokens, (b,) + tokens.shape[1:])
  index = jnp.broadcast_to(jnp.arange(t), (b, t))
  base = make_mask(segment_ids, segment_ids, index, index, causal)
  if band is not None:
    base &= band_mask(t, band)[None]
  heads = tokens.shape[1]
  table_head = np.arange(n) if heads == n else (np.arange(n) // g if heads == kvh else np.zeros(n, int))
  mask_bnts = base[:, None] & tokens[:, table_head]
  return per_head_reference_attention(q_btnh, k_bskh, v_bskh, mask_bnts)


def per_head_reference_attention(q_btnh, k_bskh, v_bskh, mask_bnts) -> jax.Array:
  """`kernels.reference.reference_attention` with a different mask per query head (one head per call, vmapped)."""
  n, kvh = q_btnh.shape[2], k_bskh.shape[2]
  kv_of = np.arange(n) // (n // kvh)  # query head n reads kv head n // G
  one = lambda q, k, v, m: reference_attention(q[:, :, None], k[:, :, None], v[:, :, None], m)[:, :, 0]
  return jax.vmap(one, in_axes=(2, 2, 2, 1), out_axes=2)(q_btnh, k_bskh[:, :, kv_of], v_bskh[:, :, kv_of], mask_bnts)


# ----------------------------------------------------------------------------------------------------------------
# Fixed block tables (numpy, built at trace time: shapes depend only on the length)
# ----------------------------------------------------------------------------------------------------------------


def pack_rows(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Ragged rows of distinct block indices -> (kv_blocks [C, M], kv_valid [C, M])."""
  m = max(1, max(len(r) for r in rows))
  blocks = np.zeros((len(rows), m), np.int32)
  valid = np.zeros((len(rows), m), bool)
  for i, row in enumerate(rows):
    if len(set(row)) != len(row):
      raise ValueError(f"block table row {i} lists a block twice: {row}")
    blocks[i, :len(row)] = row
    valid[i, :len(row)] = True
  return blocks, valid


def stack_heads(tables: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  """Per-head (kv_blocks [C, M_h], kv_valid) -> [1, heads, C, max M_h] with padding entries invalid."""
  m = max(t[0].shape[1] for t in tables)
  pad = lambda x: np.pad(x, ((0, 0), (0, m - x.shape[1])))
  return (np.stack([pad(t[0]) for t in tables])[None], np.stack([pad(t[1]) for t in tables])[None])


def local_rows(nb: int, causal: bool, before: int, after: int) -> list[list[int]]:
  """Query block i -> key blocks i-before .. i (+after unless causal), inside [0, nb)."""
  hi = 0 if causal else after
  return [[j for j in range(i - before, i + hi + 1) if 0 <= j < nb] for i in range(nb)]


def strided_rows(nb: int, causal: bool, radius: int, stride: int) -> list[list[int]]:
  """Block-level Sparse Transformer "strided": the neighbours within `radius` plus every
  `stride`-th block counted from the query block ((i - j) mod stride == 0)."""
  rows = []
  for i in range(nb):
    js = [j for j in range(nb) if abs(i - j) <= radius or (i - j) % stride == 0]
    rows.append([j for j in js if not causal or j <= i])
  return rows


def random_rows(nb: int, causal: bool, num_random: int, rng: np.random.Generator) -> list[list[int]]:
  """The diagonal block plus `num_random` distinct other blocks (causal: earlier ones) drawn from `rng`."""
  rows = []
  for i in range(nb):
    others = [j for j in range(nb) if j != i and (not causal or j < i)]
    pick = rng.choice(others, size=min(num_random, len(others)), replace=False) if others else []
    rows.append([i] + sorted(int(j) for j in pick))
  return rows


def head_block_mask(kv_blocks, kv_valid, num_blocks_: int, num_heads: int, num_kv_heads: int) -> jax.Array:
  """A table's block mask per query head, [B or 1, N or 1, C, C]: a table given per kv head
  serves its group of query heads, a single table every head (as the engine reads it)."""
  blocks = block_table_mask(kv_blocks, kv_valid, num_blocks_)
  heads = blocks.shape[1]
  if heads == 1 or heads == num_heads:
    return blocks
  return blocks[:, np.arange(num_heads) // (num_heads // num_kv_heads)]


PATTERNS = ("local", "strided", "random", "full")
TableFn = Callable[[int], tuple[np.ndarray, np.ndarray]]


def check_storage_order(ctx: MixContext, name: str) -> None:
  if getattr(ctx, "index", None) is not None:
    raise NotImplementedError(f"{name} needs tokens in storage order (its blocks are contiguous runs of tokens); "
                              f"a permuted layout (ctx.index, e.g. zigzag sequence parallelism) is not supported")


class BlockSparseAttention(PatternCacheMixin, Attention):
  """Attention restricted to a fixed block table (config group `model.block_sparse`).

  Options: `block` (rows per block, default 64); `pattern`:
    "local"   - each query block sees its `radius` neighbouring blocks on each side (causal: earlier side only);
    "strided" - "local" plus every `stride`-th block counted back (and, bidirectional, forward) from the query
                block: block-level Sparse Transformer strided; M = 2*radius + 1 + T/(stride*block), O(T^2/stride);
    "random"  - the diagonal block plus `num_random` random blocks per query block and head (causal: earlier
                blocks), fixed per layer from (`seed`, layer index);
    "full"    - every block (dense attention through the engine; for tests and ablations).
  A table can also be given programmatically: `table=fn` with fn(num_blocks) -> (kv_blocks, kv_valid) in the
  engine's layout (numpy, [1, heads, num_blocks, M]).

  Causal models decode (`init_cache(batch, max_len, dtype)`, then calls with ctx.decode): a dense KV cache of
  max_len slots; the query at position p attends over it with row p // block of the table built for
  ceil(max_len / block) blocks (so "random" draws the same blocks as a forward over max_len tokens), which
  equals the full causal forward over max_len tokens at the same positions. Padding is not stored (see
  `decode.PatternCacheMixin`). Cost O(max_len) per decoded token (the dense path), whatever M is.
  """

  LAYER_INDEXED = True  # the random pattern is drawn per layer

  # Blocks are contiguous runs of stored tokens: only compiler-propagated sharding ("auto") of
  # the length axis; Attention's explicit ring / all-to-all / all-gather paths do not apply.
  SEQUENCE_CAPABILITIES = frozenset()  # no explicit strategy: the compiler's sharding only

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs, table: TableFn | None = None):
    super().__init__(spec, rngs=rngs)
    self.block = int(spec.option("block", 64))
    self.pattern = spec.option("pattern", "local")
    self.radius = int(spec.option("radius", 1))
    self.stride = int(spec.option("stride", 4))
    self.num_random = int(spec.option("num_random", 2))
    self.seed = int(spec.option("seed", 0))
    if self.block < 1:
      raise ValueError(f"model.block_sparse.block={self.block} must be a positive number of tokens")
    if table is None and self.pattern not in PATTERNS:
      raise ValueError(f"model.block_sparse.pattern={self.pattern!r} is not one of {', '.join(PATTERNS)}")
    if self.radius < 0 or self.stride < 1 or self.num_random < 0:
      raise ValueError(f"model.block_sparse needs radius >= 0, stride >= 1 and num_random >= 0; got radius="
                       f"{self.radius}, stride={self.stride}, num_random={self.num_random}")
    self.table_fn = table

  def decode_name(self) -> str:
    return "block_sparse"

  def decode_pattern(self, position_bt, size: int):
    nb = num_blocks(size, self.block)
    blocks, valid = self.block_table(nb)
    mask = head_block_mask(blocks, valid, nb, self.spec.num_heads, self.spec.num_kv_heads)
    return block_mask_rows(mask, position_bt, self.block, size)

  def block_table(self, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """(kv_blocks, kv_valid) [1, heads, nb, M] for a sequence of `nb` blocks."""
    if self.table_fn is not None:
      return self.table_fn(nb)
    causal = self.spec.causal
    if self.pattern == "local":
      return stack_heads([pack_rows(local_rows(nb, causal, self.radius, self.radius))])
    if self.pattern == "strided":
      return stack_heads([pack_rows(strided_rows(nb, causal, self.radius, self.stride))])
    if self.pattern == "full":
      return stack_heads([pack_rows(local_rows(nb, causal, nb, nb))])
    rng = np.random.default_rng((self.seed, self.spec.layer_index))
    return stack_heads([pack_rows(random_rows(nb, causal, self.num_random, rng)) for _ in range(self.spec.num_heads)])

  def attend(self, q_btnh, k_btkh, v_btkh, ctx: MixContext) -> jax.Array:
    check_storage_order(ctx, "block_sparse")
    blocks, valid = self.block_table(num_blocks(q_btnh.shape[1], self.block))
    return block_sparse_attention(q_btnh, k_btkh, v_btkh, ctx.segment_ids, blocks, valid, block=self.block,
                                  causal=self.spec.causal, impl=self.spec.attention_impl)


# ----------------------------------------------------------------------------------------------------------------
# XAttention (docs/papers.md#xattention)
# ----------------------------------------------------------------------------------------------------------------


def tile_segment_range(segment_ids, tile: int) -> tuple[jax.Array, jax.Array]:
  """(lo, hi) [B, T/tile]: each tile's smallest nonzero segment id (int32 max if none) and largest id."""
  b, t = segment_ids.shape
  seg = segment_ids.reshape(b, t // tile, tile)
  lo = jnp.min(jnp.where(seg > 0, seg, jnp.iinfo(jnp.int32).max), axis=-1)
  return lo, jnp.max(seg, axis=-1)


def tile_visible(segment_ids, tile: int, causal: bool) -> jax.Array:
  """[B, R, R]: may any (query, key) token pair of tile pair (r, s) be visible?

  By each tile's range of nonzero segment ids (exact for contiguous segments, a superset
  otherwise) and, if causal, s <= r.
  """
  lo, hi = tile_segment_range(segment_ids, tile)
  vis = (hi[:, :, None] > 0) & (hi[:, None, :] > 0) & (lo[:, :, None] <= hi[:, None, :]) & (
      lo[:, None, :] <= hi[:, :, None])
  if causal:
    r = jnp.arange(lo.shape[1])
    vis &= r[None, :] <= r[:, None]
  return vis


def xattention_block_mass(q_btnh, k_btkh, segment_ids, *, block: int, stride: int, causal: bool) -> jax.Array:
  """XAttention's block scores s_IJ [B, N, C, C] (fp32, no gradient).

  Coarse scores A[i, j] = (1/S) sum_t q[iS+S-1-t] . k[jS+t] / sqrt(H): the mean of the
  antidiagonal of each S x S tile (queries concatenated in reverse order), softmax over
  the visible coarse keys of each coarse query, summed over the (B/S)^2 tiles of a block.
  Padding tokens are zeroed (like the official zero padding) and invisible tiles masked.
  Packed rows: an antidiagonal term counts only when its query and key tokens share a
  segment, so a tile that straddles a segment boundary scores each example against itself
  only and no example's content moves another's selection (the paper has one sequence per
  row; with one segment this is its score exactly). The S terms are accumulated one by one
  ([B, N, T/S, T/S] live, the same FLOPs as one contraction over S*H).
  """
  q_btnh, k_btkh = jax.lax.stop_gradient(q_btnh), jax.lax.stop_gradient(k_btkh)
  b, t, n, h = q_btnh.shape
  kvh = k_btkh.shape[2]
  nb = num_blocks(t, block)
  tp, r = nb * block, nb * block // stride
  seg = pad_length(jnp.asarray(segment_ids, jnp.int32), tp)
  real = (seg > 0)[:, :, None, None]
  q = jnp.where(real, pad_length(q_btnh, tp), 0).astype(jnp.float32)
  k = jnp.where(real, pad_length(k_btkh, tp), 0).astype(jnp.float32)
  # Term u of tile (i, j): query iS+S-1-u against key jS+u. Leading axis u for the scan.
  q_u = jnp.moveaxis(q.reshape(b, r, stride, kvh, n // kvh, h)[:, :, ::-1], 2, 0)
  k_u = jnp.moveaxis(k.reshape(b, r, stride, kvh, h), 2, 0)
  sq_u = jnp.moveaxis(seg.reshape(b, r, stride)[:, :, ::-1], 2, 0)
  sk_u = jnp.moveaxis(seg.reshape(b, r, stride), 2, 0)

  def add_term(acc, xs):
    qu, ku, squ, sku = xs
    same = (squ[:, :, None] == sku[:, None, :])[:, None, None]  # [b, 1, 1, r, r]
    return acc + jnp.where(same, jnp.einsum("brkgh,bskh->bkgrs", qu, ku), 0.0), None

  zero = jnp.zeros((b, kvh, n // kvh, r, r), jnp.float32)
  scores, _ = jax.lax.scan(add_term, zero, (q_u, k_u, sq_u, sk_u))
  scores = scores.reshape(b, n, r, r) / (math.sqrt(h) * stride)
  vis = tile_visible(seg, stride, causal)[:, None]
  probs = jnp.where(vis, jax.nn.softmax(jnp.where(vis, scores, MASK_VALUE), axis=-1), 0.0)
  per = block // stride
  return probs.reshape(b, n, nb, per, nb, per).sum(axis=(3, 5))


def segment_sink_blocks(segment_ids, block: int) -> jax.Array:
  """[B, C] int32: for each query block, the first block of the segment its first real token
  belongs to (XAttention's "sink", key block 0 for an unpacked row; 0 for a padding block).
  Segments are taken as contiguous runs, as packing lays them out."""
  lo, hi = tile_segment_range(segment_ids, block)
  holds = (lo[:, None, :] <= lo[:, :, None]) & (lo[:, :, None] <= hi[:, None, :])  # [B, I, J]: J holds I's first id
  return jnp.argmax(holds, axis=-1).astype(jnp.int32)


def xattention_select(mass_bncc, visible_bcc, *, threshold: float, max_blocks: int | None = None, sink_bc=None,
                      exact_bc=None):
  """Per query block, the forced blocks (the sink, key block 0 or `sink_bc`, and the
  diagonal) plus the smallest greedy set of the others, by descending mass, whose cumulative
  mass (forced included) reaches `threshold` x the row's total; rows flagged in `exact_bc`
  [B, C] keep every visible block. Returns (kv_blocks, kv_valid) [B, N, C, M], kept entries
  first. `threshold >= 1` keeps every visible block (the greedy rule would too, up to
  rounding of the cumulative sum and probabilities that underflow to 0).
  """
  b, n, nb, _ = mass_bncc.shape
  i, j = jnp.arange(nb)[:, None], jnp.arange(nb)[None, :]
  sink = jnp.zeros((b, nb), jnp.int32) if sink_bc is None else sink_bc
  forced = (j[None, None] == sink[:, None, :, None]) | (j == i)[None, None]
  forced = jnp.broadcast_to(forced, mass_bncc.shape)
  visible = visible_bcc[:, None]
  # Forced blocks sort first (stable, in block order), then the others by descending mass.
  order = jnp.argsort(jnp.where(forced, -jnp.inf, -mass_bncc), axis=-1, stable=True)
  mass_sorted = jnp.take_along_axis(mass_bncc, order, axis=-1)
  forced_sorted = jnp.take_along_axis(forced, order, axis=-1)
  other = jnp.where(forced_sorted, 0.0, mass_sorted)
  before = jnp.sum(jnp.where(forced, mass_bncc, 0.0), axis=-1, keepdims=True) + jnp.cumsum(other, axis=-1) - other
  if threshold >= 1.0:
    keep = jnp.ones_like(forced_sorted)
  else:
    keep = forced_sorted | (before < threshold * jnp.sum(mass_bncc, axis=-1, keepdims=True))
    if exact_bc is not None:
      keep |= exact_bc[:, None, :, None]
  keep &= jnp.take_along_axis(jnp.broadcast_to(visible, mass_bncc.shape), order, axis=-1) | forced_sorted
  if max_blocks is not None:
    order, keep = order[..., :max_blocks], keep[..., :max_blocks]
  return order.astype(jnp.int32), keep


def reference_xattention_block_mask(q, k, segment_ids, *, block: int, stride: int, threshold: float,
                                    causal: bool, selection: str = "block") -> np.ndarray:
  """XAttention's selection written out with numpy loops: bool [B, N, C, C] (the twin of
  `XAttention.block_table`: token-pair segment masking of the antidiagonal terms, each
  segment's first block as the sink, query blocks holding two segments keeping every visible
  block, `selection="previous"` scoring block I by block I-1's queries)."""
  q, k, seg = np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(segment_ids)
  b, t, n, h = q.shape
  g = n // k.shape[2]
  nb = num_blocks(t, block)
  tp, r = nb * block, nb * block // stride
  pad = lambda x: np.concatenate([x, np.zeros((b, tp - t) + x.shape[2:], x.dtype)], axis=1)
  q, k, seg = pad(q), pad(k), pad(seg)

  def tiles_see(s1, s2, size):
    a, c = seg[bi, s1 * size:(s1 + 1) * size], seg[bi, s2 * size:(s2 + 1) * size]
    a, c = a[a > 0], c[c > 0]
    if not len(a) or not len(c) or (causal and s2 > s1):
      return False
    return a.min() <= c.max() and c.min() <= a.max()

  def sink_of(bq):
    ids = seg[bi, bq * block:(bq + 1) * block]
    if not (ids > 0).any():
      return 0
    first = ids[ids > 0].min()
    return min(x for x in range(nb) if first in seg[bi, x * block:(x + 1) * block])

  out = np.zeros((b, n, nb, nb), bool)
  for bi in range(b):
    for ni in range(n):
      coarse = np.full((r, r), -np.inf)
      for ri in range(r):
        for si in range(r):
          if tiles_see(ri, si, stride):
            terms = []
            for u in range(stride):
              qi, ki = ri * stride + stride - 1 - u, si * stride + u
              if seg[bi, qi] > 0 and seg[bi, qi] == seg[bi, ki]:
                terms.append(q[bi, qi, ni] @ k[bi, ki, ni // g])
            coarse[ri, si] = sum(terms) / (math.sqrt(h) * stride)
      probs = np.zeros_like(coarse)
      for ri in range(r):
        if np.isfinite(coarse[ri]).any():
          e = np.exp(coarse[ri] - coarse[ri].max())
          probs[ri] = e / e.sum()
      per = block // stride
      for bq in range(nb):
        vis = np.array([tiles_see(bq, bk, block) for bk in range(nb)])
        src = bq - 1 if selection == "previous" else bq  # whose queries score this row
        mass = np.zeros(nb)
        if src >= 0:
          mass = np.array([probs[src * per:(src + 1) * per, bk * per:(bk + 1) * per].sum() for bk in range(nb)])
        mass = np.where(vis, mass, 0.0)
        forced = {sink_of(bq), bq}
        ids = seg[bi, bq * block:(bq + 1) * block]
        if len(set(ids[ids > 0])) > 1:  # two examples share this query block: every visible block
          out[bi, ni, bq] = vis | np.isin(np.arange(nb), list(forced))
          continue
        chosen = set(forced)
        total = sum(mass[x] for x in forced)
        for bk in sorted((x for x in range(nb) if x not in chosen), key=lambda x: -mass[x]):
          if threshold >= 1.0 or total < threshold * mass.sum():
            chosen.add(bk)
            total += mass[bk]
        out[bi, ni, bq] = [x in chosen and (vis[x] or x in forced) for x in range(nb)]
  return out


class XAttention(Attention):
  """XAttention (docs/papers.md#xattention): a block table chosen per input by antidiagonal scoring.

  Options (config group `model.xattention`): `block` (B, default 128 as in the paper's
  kernel), `stride` (S, default 8; B must be a multiple of S), `threshold` (tau, default
  0.9, the official estimator's), `max_blocks` (0 = no cap; else at most this many
  blocks per query block, cutting the tail of the greedy set), `selection` (whose queries
  score query block I's row: "block", the paper's rule, block I's own; "previous", block
  I-1's; "auto", the default: "previous" when causal, "block" otherwise).

  Why "previous" for causal models: the paper selects blocks for prefilling a known prompt,
  so query block I is scored with all of its queries. In a causal model that makes the
  output at position t depend on the later tokens of its block (which blocks t attends is
  chosen with them), so a causal LM trained that way sees a little of its future. Scoring
  block I from block I-1 uses only tokens before block I, which keeps every output a
  function of its past (a test); the first block then keeps only itself. The paper's rule
  remains `selection=block`.

  The sink (each segment's first block; key block 0 for an unpacked row) and the diagonal
  block are always kept and their mass counted first, as in the official causal code.
  Bidirectional deviates slightly: the official code sorts all blocks without forced ones
  (and keeps block 0 as a side effect); we force the sink and the diagonal there too, so
  every token sees itself. Packed rows (contiguous segments): antidiagonal terms count only
  within a segment (`xattention_block_mass`), and a query block that holds two examples keeps
  every block either can see (one table serves the whole block, so a threshold over their
  pooled mass would let one example's content choose the other's blocks); so each output is a
  function of its own example alone (a test). The selection is not differentiated.
  Cost: estimation O(T^2 H / S) (scores [B, N, T/S, T/S]), attention O(rho T^2 H) for
  block density rho (steps beyond the longest kept row are skipped).
  Incremental decoding is not supported (init_cache and decode calls raise): the selection scores whole
  query blocks against the input, which a query arriving one token at a time does not have.
  """

  # Blocks are contiguous runs of stored tokens: only compiler-propagated sharding ("auto") of
  # the length axis; Attention's explicit ring / all-to-all / all-gather paths do not apply.
  SEQUENCE_CAPABILITIES = frozenset()  # no explicit strategy: the compiler's sharding only

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.block = int(spec.option("block", 128))
    self.stride = int(spec.option("stride", 8))
    self.threshold = float(spec.option("threshold", 0.9))
    self.max_blocks = int(spec.option("max_blocks", 0)) or None
    selection = spec.option("selection", "auto")
    if selection not in ("auto", "block", "previous"):
      raise ValueError(f"model.xattention.selection={selection!r} is not one of auto, block, previous")
    if selection == "previous" and not spec.causal:
      raise ValueError("model.xattention.selection='previous' is for causal models (it keeps outputs causal); "
                       "a bidirectional model uses 'block'")
    self.selection = ("previous" if spec.causal else "block") if selection == "auto" else selection
    if self.block < 1 or self.stride < 1 or self.block % self.stride:
      raise ValueError(f"model.xattention.block={self.block} must be a positive multiple of "
                       f"model.xattention.stride={self.stride}")
    if not 0.0 < self.threshold:
      raise ValueError(f"model.xattention.threshold={self.threshold} must be > 0 (1.0 = every block)")

  DECODE_ERROR = ("xattention does not support incremental decoding (decode=True): it selects key blocks per "
                  "input by scoring whole query blocks, which a query arriving one token at a time does not have")

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    raise NotImplementedError(self.DECODE_ERROR)

  def attend_cached(self, q_btnh, k_btkh, v_btkh, ctx: MixContext) -> jax.Array:
    raise NotImplementedError(self.DECODE_ERROR)

  def block_table(self, q_btnh, k_btkh, segment_ids):
    """(kv_blocks, kv_valid) [B, N, C, M] for this input."""
    mass = xattention_block_mass(q_btnh, k_btkh, segment_ids, block=self.block, stride=self.stride,
                                 causal=self.spec.causal)
    nb = mass.shape[-1]
    if self.selection == "previous":  # row I scored by block I-1's queries; block 0 keeps only itself
      mass = jnp.concatenate([jnp.zeros_like(mass[:, :, :1]), mass[:, :, :-1]], axis=2)
    seg = pad_length(jnp.asarray(segment_ids, jnp.int32), nb * self.block)
    visible = tile_visible(seg, self.block, self.spec.causal)
    mass = jnp.where(visible[:, None], mass, 0.0)  # a block this row cannot see takes no share of tau
    lo, hi = tile_segment_range(seg, self.block)
    return xattention_select(mass, visible, threshold=self.threshold, max_blocks=self.max_blocks,
                             sink_bc=segment_sink_blocks(seg, self.block), exact_bc=(hi > 0) & (lo != hi))

  def attend(self, q_btnh, k_btkh, v_btkh, ctx: MixContext) -> jax.Array:
    check_storage_order(ctx, "xattention")
    blocks, valid = self.block_table(q_btnh, k_btkh, ctx.segment_ids)
    return block_sparse_attention(q_btnh, k_btkh, v_btkh, ctx.segment_ids, blocks, valid, block=self.block,
                                  causal=self.spec.causal, impl=self.spec.attention_impl)
