"""Attention backends: the one place `model.attention_impl` is resolved and an implementation called.

Every softmax-attention mixer, the decode path and the sequence-parallel strategies call the
functions below with the configured `impl`; none of them compares backend names. A backend is
a `Backend` subclass registered under its config name:

| name    | computes with                                                   | falls back to |
|---------|-----------------------------------------------------------------|---------------|
| `xla`   | dense scores (`kernels.reference`): the obviously-correct twin  | -             |
| `flash` | the pure-JAX blockwise online softmax (`layers.attention.flash`) | -             |
| `pallas`| fused kernels: Triton on GPU (interpreted on CPU), Mosaic on TPU | flash's split-KV decode and the pure-JAX block-sparse engine, for shapes the kernels cannot tile |
| `cudnn` | `jax.nn.dot_product_attention`'s cuDNN kernel for storage-order self-attention | flash |
| `mgpu`  | the Hopper Mosaic GPU kernels for storage-order self-attention  | pallas        |
| `auto`  | `pallas` on GPU and TPU, `flash` elsewhere                      |               |

"Falls back" is inheritance: a backend overrides the operations it accelerates and inherits
the rest (`cudnn` is `flash` except for full-sequence self-attention, `mgpu` is `pallas`
except for it). Adding a backend is one subclass and one `register` call; `trainer/config.py`
takes its list of choices and its refusals (`Backend.refusal`) from here.

Operations (all with the `[B, T, N, H]` / `[B, S, K, H]` layout, segment ids 0 = padding,
causal by the absolute positions `q_index` / `kv_index`):
- `attention` / `attention_lse`: queries against keys (self-attention, a visiting ring chunk,
  global rows of a sparse pattern);
- `ring_forward` / `ring_backward`: the accumulation steps of ring attention (parallel/);
- `decode_attention`: new tokens over a KV cache;
- `block_sparse_kernel`: the fused kernel for a block-sparse table, if the backend has one.
Kernel modules are imported when first used: a run that never selects a kernel never loads Pallas.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import jax
import jax.numpy as jnp

from kernels.reference import make_mask, merge_partials, reference_attention_lse
from layers.attention.decode import split_kv_decode_attention
from layers.attention import flash as blockwise


@dataclasses.dataclass(frozen=True)
class Options:
  """How a backend tiles one call (from the mixer's `model.<mixer>` options)."""
  block_q: int = 128
  block_k: int = 128
  per_row: bool = False  # pure-JAX flash: one query row's blocks at a time (less memory, more steps)
  decode_chunk: int = 256  # cache slots per split of the pure-JAX split-KV decode

  @classmethod
  def of(cls, spec) -> "Options":
    """The options a `MixerSpec` carries (defaults for keys it does not set)."""
    return cls(block_q=int(spec.option("block_q", 128)), block_k=int(spec.option("block_k", 128)),
               per_row=bool(spec.option("per_row", False)), decode_chunk=int(spec.option("decode_chunk", 256)))


def _kernel(module: str, name: str) -> Callable:
  """A kernel function, imported on first use (looked up at call time, so tests can wrap it)."""
  return getattr(importlib.import_module(f"kernels.{module}"), name)


def _positions(b: int, t: int):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


class Backend:
  """An attention backend. Subclasses override what they accelerate and inherit the rest."""

  name = ""
  doc = ""

  def refusal(self, *, dtype: str, head_dim: int, platform: str | None = None) -> str | None:
    """A sentence saying why this backend cannot run such a model on `platform` (default: JAX's
    default backend, looked up only by backends that depend on it), or None."""
    return None

  def attention_lse(self, q, k, v, qseg, kseg, qidx, kidx, *, causal: bool, options: Options, out_dtype=None):
    """(out [B, T, N, H], lse [B, T, N] fp32; -inf where a query sees no key). `out_dtype`: the
    output's dtype (default q's); the pure-JAX blockwise path rounds to q's dtype first."""
    raise NotImplementedError

  def attention(self, q, k, v, qseg, kseg, qidx, kidx, *, causal: bool, options: Options, storage_order: bool):
    """out [B, T, N, H]. `storage_order`: self-attention whose positions are 0..T-1 (a backend may
    then mask by loop bounds or lengths instead of reading the positions)."""
    return self.attention_lse(q, k, v, qseg, kseg, qidx, kidx, causal=causal, options=options)[0]

  def ring_forward(self, q, qseg, qidx, *, causal: bool, options: Options):
    """(add, finish) of ring attention's forward: add((k, v, kseg, kidx), acc or None) folds one
    visiting chunk into the running result; finish(acc) -> (out fp32, lse)."""
    t, n = q.shape[1], q.shape[2]
    add = lambda kv, acc: blockwise.flash_accumulate(q, kv[0], kv[1], qseg, kv[2], qidx, kv[3], acc, causal=causal,
                                                     block_q=options.block_q, block_k=options.block_k)
    return add, lambda acc: blockwise.flash_finish(acc, t, n)

  def ring_backward(self, q, k, qseg, qidx, out, lse, d_out, *, causal: bool, options: Options):
    """(init, add, finish) of ring attention's backward fp32 (dq, dk, dv) accumulators:
    add((k, v, kseg, kidx), acc) adds the visiting chunk's contributions given the final out/lse.
    The pure-JAX path keeps the accumulators in the blocks' own layout."""
    bq, bk = options.block_q, options.block_k
    init = lambda: blockwise.chunk_grad_accumulators(q.shape, k.shape, block_q=bq, block_k=bk)
    add = lambda kv, acc: blockwise.flash_chunk_grads(q, kv[0], kv[1], qseg, kv[2], qidx, kv[3], out, lse, d_out,
                                                      causal=causal, block_q=bq, block_k=bk, acc=acc)
    return init, add, lambda acc: blockwise.unblock_chunk_grads(acc, q.shape[1], k.shape[1])

  def decode_attention(self, q, k_cache, v_cache, length, qseg, kseg, *, causal: bool, options: Options,
                       platform: str):
    """T new tokens of every row over a KV cache written up to `length` (one write position for
    the batch). Default: the pure-JAX split-KV path."""
    lengths = jnp.full((q.shape[0],), length, jnp.int32)
    return split_kv_decode_attention(q, k_cache, v_cache, lengths, q_segment_ids=qseg, kv_segment_ids=kseg,
                                     causal=causal, chunk=options.decode_chunk)

  def block_sparse_kernel(self, block: int, platform: str) -> Callable | None:
    """A fused kernel with `block_sparse_attention`'s contract for this block size, or None (the
    pure-JAX engine runs)."""
    return None


class Dense(Backend):
  name = "xla"
  doc = "dense scores in fp32 (O(T^2) memory): the reference every other backend is tested against"

  def attention_lse(self, q, k, v, qseg, kseg, qidx, kidx, *, causal, options, out_dtype=None):
    # The reference computes in fp32 whatever q's dtype: an fp32 q makes it return fp32 too.
    q_in = q if out_dtype is None else q.astype(jnp.float32)
    out, lse = reference_attention_lse(q_in, k, v, make_mask(qseg, kseg, qidx, kidx, causal))
    return out.astype(out_dtype or q.dtype), lse


class Flash(Backend):
  name = "flash"
  doc = "pure-JAX blockwise online softmax (O(T) memory), any platform"

  def attention_lse(self, q, k, v, qseg, kseg, qidx, kidx, *, causal, options, out_dtype=None):
    out, lse = blockwise.flash_attention_lse(q, k, v, qseg, kseg, qidx, kidx, causal=causal, block_q=options.block_q,
                                             block_k=options.block_k, per_row=options.per_row)
    return (out if out_dtype is None else out.astype(out_dtype)), lse


def _largest_block(size: int, candidates) -> int | None:
  return next((c for c in candidates if size % c == 0), None)


class Pallas(Flash):
  name = "pallas"
  doc = "fused Pallas kernels: Triton on GPU (interpret mode on CPU), Mosaic on TPU"

  def attention_lse(self, q, k, v, qseg, kseg, qidx, kidx, *, causal, options, out_dtype=None, storage_order=False):
    pos = {} if storage_order else dict(q_index=qidx, kv_index=kidx)
    if jax.default_backend() == "tpu":
      return _kernel("flash_tpu", "flash_attention_tpu_lse")(q, k, v, qseg, kseg, causal=causal, out_dtype=out_dtype,
                                                             **(pos or dict(q_index=None, kv_index=None)))
    return _kernel("flash_pallas", "flash_attention_pallas_lse")(q, k, v, qseg, kseg, causal=causal,
                                                                 out_dtype=out_dtype, **pos)

  def attention(self, q, k, v, qseg, kseg, qidx, kidx, *, causal, options, storage_order):
    # Storage order: the kernels' causal loop bounds instead of reading positions.
    return self.attention_lse(q, k, v, qseg, kseg, qidx, kidx, causal=causal, options=options,
                              storage_order=storage_order)[0]

  def ring_forward(self, q, qseg, qidx, *, causal, options):
    # The kernels return normalised partials, merged with the (out, lse) rule.
    part = lambda kv: self.attention_lse(q, kv[0], kv[1], qseg, kv[2], qidx, kv[3], causal=causal, options=options,
                                         out_dtype=jnp.float32)
    add = lambda kv, acc: part(kv) if acc is None else merge_partials(*acc, *part(kv))
    return add, lambda acc: acc

  def ring_backward(self, q, k, qseg, qidx, out, lse, d_out, *, causal, options):
    if jax.default_backend() == "tpu":
      grads = _kernel("flash_tpu", "flash_chunk_grads_tpu")
    else:
      grads = _kernel("flash_pallas", "flash_chunk_grads_pallas")

    def add(kv, acc):
      dq, dk, dv = grads(q, kv[0], kv[1], qseg, kv[2], qidx, kv[3], out, lse, d_out, causal=causal)
      return acc[0] + dq, acc[1] + dk.astype(jnp.float32), acc[2] + dv.astype(jnp.float32)

    init = lambda: tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, k))
    return init, add, lambda acc: acc

  def decode_attention(self, q, k_cache, v_cache, length, qseg, kseg, *, causal, options, platform):
    b, t, n, h = q.shape
    s, kvh = k_cache.shape[1], k_cache.shape[2]
    lengths = jnp.full((b,), length, jnp.int32)
    if causal and n // kvh * t <= 64:  # a few query rows per kv head: the split-KV decode kernels
      if platform == "tpu":
        block = _largest_block(s, (512, 256, 128, 64, 32, 16, 8))
        if h % 128 == 0 and block:
          return _kernel("decode_tpu", "decode_attention_tpu")(q, k_cache, v_cache, lengths, q_segment_ids=qseg,
                                                               kv_segment_ids=kseg, block_k=block)
      else:
        block = _largest_block(s, (64, 32, 16))
        if h >= 16 and not h & (h - 1) and block:
          return _kernel("decode_pallas", "decode_attention_pallas")(q, k_cache, v_cache, lengths, q_segment_ids=qseg,
                                                                     kv_segment_ids=kseg, block_k=block)
      return super().decode_attention(q, k_cache, v_cache, length, qseg, kseg, causal=causal, options=options,
                                      platform=platform)
    # A long prefill or a bidirectional model: the flash kernel with explicit positions (causal
    # tiles past the new tokens skipped at run time).
    q_index = jnp.broadcast_to(length - t + jnp.arange(t, dtype=jnp.int32), (b, t))
    return self.attention_lse(q, k_cache, v_cache, qseg, kseg, q_index, _positions(b, s), causal=causal,
                              options=options)[0]

  def block_sparse_kernel(self, block, platform):
    if platform == "tpu":
      return _kernel("block_sparse_tpu", "block_sparse_attention_tpu") if block % 8 == 0 else None
    if block >= 16 and not block & (block - 1):
      return _kernel("block_sparse_pallas", "block_sparse_attention_pallas")
    return None


def one_example_per_row(segment_ids_bt) -> jax.Array:
  """Scalar bool: every row is one example (a single nonzero id from position 0) followed only
  by padding, i.e. fully described by its length. Padding-only rows count as such."""
  seg = jnp.asarray(segment_ids_bt, jnp.int32)
  lengths = jnp.sum(seg > 0, axis=1)
  first = jnp.arange(seg.shape[1])[None, :] < lengths[:, None]
  return jnp.all(seg == jnp.where(first, seg[:, :1], 0))


def cudnn_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, *, causal: bool, block: int = 128,
                    implementation: str = "cudnn") -> jax.Array:
  """`jax.nn.dot_product_attention`'s fused cuDNN kernel (forward and backward) for rows that
  hold one example followed by padding, passed as per-row lengths; a batch with packed rows
  (or padding before a real token) takes the pure-JAX blockwise path instead, chosen at run
  time (`lax.cond`), so the result is exact for every input. Padding queries give zeros.
  cuDNN takes 16-bit inputs only (bfloat16 / float16); `implementation="xla"` runs the same
  call through XLA, which is how the CPU tests check the wiring.
  """
  if implementation == "cudnn" and q_btnh.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention_impl='cudnn' takes bfloat16 or float16 activations, got {q_btnh.dtype} "
                     f"(set model.dtype=bfloat16)")
  seg = jnp.asarray(segment_ids_bt, jnp.int32)
  lengths = jnp.maximum(jnp.sum(seg > 0, axis=1), 1).astype(jnp.int32)  # an all-padding row: zeroed below

  def fused(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, implementation=implementation)

  def blockwise_path(q, k, v):
    idx = _positions(*seg.shape)
    return blockwise.flash_attention_lse(q, k, v, seg, seg, idx, idx, causal=causal, block_q=block,
                                         block_k=block)[0]

  out = jax.lax.cond(one_example_per_row(seg), fused, blockwise_path, q_btnh, k_btkh, v_btkh)
  return jnp.where((seg > 0)[:, :, None, None], out, 0).astype(q_btnh.dtype)


def _needs_gpu(name: str, platform: str | None, dtype: str) -> str | None:
  platform = platform or jax.default_backend()
  if platform != "gpu":
    return (f"model.attention_impl={name!r} needs an NVIDIA GPU, but this run's backend is {platform!r}; use "
            f"'auto' (Pallas on GPU/TPU, blockwise 'flash' elsewhere)")
  if dtype != "bfloat16":
    return (f"model.attention_impl={name!r} takes 16-bit activations, but model.dtype={dtype!r}; set "
            f"model.dtype=bfloat16")
  return None


class Cudnn(Flash):
  name = "cudnn"
  doc = "cuDNN's fused kernel for storage-order self-attention (NVIDIA GPU, bfloat16); flash otherwise"

  def refusal(self, *, dtype, head_dim, platform=None):
    return _needs_gpu(self.name, platform, dtype)

  def attention(self, q, k, v, qseg, kseg, qidx, kidx, *, causal, options, storage_order):
    if storage_order:  # lengths describe storage-order rows only
      return cudnn_attention(q, k, v, qseg, causal=causal, block=options.block_q)
    return super().attention(q, k, v, qseg, kseg, qidx, kidx, causal=causal, options=options,
                             storage_order=storage_order)


class MosaicGpu(Pallas):
  name = "mgpu"
  doc = "the Hopper Mosaic GPU kernels for storage-order self-attention (bfloat16, head dim 64/128); pallas otherwise"

  def refusal(self, *, dtype, head_dim, platform=None):
    reason = _needs_gpu(self.name, platform, dtype)
    if reason is None:
      heads = _kernel("flash_mgpu", "HEAD_DIMS")
      if head_dim not in heads:
        return f"model.attention_impl='mgpu' takes head dims {heads}, but the model's head dim is {head_dim}"
    return reason

  def attention(self, q, k, v, qseg, kseg, qidx, kidx, *, causal, options, storage_order):
    if storage_order:  # the Hopper kernels mask by storage order
      fp = importlib.import_module("kernels.flash_pallas")
      return fp.flash_attention_pallas(q, k, v, qseg, kseg, causal=causal, tiling=fp.mgpu_tiling(q.shape[-1]))
    return super().attention(q, k, v, qseg, kseg, qidx, kidx, causal=causal, options=options,
                             storage_order=storage_order)


BACKENDS: dict[str, Backend] = {}
AUTO = "auto"


def register(backend: Backend) -> Backend:
  """Makes `backend` selectable as `model.attention_impl=<backend.name>`."""
  if not backend.name or backend.name == AUTO:
    raise ValueError(f"an attention backend needs a name other than {AUTO!r}")
  BACKENDS[backend.name] = backend
  return backend


for _backend in (Dense(), Flash(), Pallas(), Cudnn(), MosaicGpu()):
  register(_backend)


def choices() -> tuple[str, ...]:
  return (*BACKENDS, AUTO)


def backend(impl: str, platform: str | None = None) -> Backend:
  """The backend `model.attention_impl=impl` means on `platform` (default: JAX's default backend)."""
  if impl == AUTO:
    impl = "pallas" if (platform or jax.default_backend()) in ("gpu", "tpu") else "flash"
  if impl not in BACKENDS:
    raise ValueError(f"model.attention_impl={impl!r} is not one of {', '.join(choices())}")
  return BACKENDS[impl]


def refusal(impl: str, *, dtype: str, head_dim: int, platform: str | None = None) -> str | None:
  """Why `impl` cannot run a model of this dtype and head dim on `platform` (one sentence), or None.
  `auto` never refuses; JAX's backend is looked up only for backends that need a platform."""
  if impl not in choices():
    return f"model.attention_impl={impl!r} is not one of {', '.join(choices())}"
  if impl == AUTO:
    return None
  return BACKENDS[impl].refusal(dtype=dtype, head_dim=head_dim, platform=platform)


# -- the operations ---------------------------------------------------------------------------


def attention(q, k, v, qseg, kseg, qidx=None, kidx=None, *, causal: bool, impl: str, options: Options = Options()):
  """Attention of q [B, T, N, H] against k, v [B, S, K, H]. `qidx`/`kidx` None: self-attention in
  storage order (positions 0..T-1), which some backends exploit."""
  storage_order = qidx is None
  if storage_order:
    qidx, kidx = _positions(*q.shape[:2]), _positions(*k.shape[:2])
  return backend(impl).attention(q, k, v, qseg, kseg, qidx, kidx, causal=causal, options=options,
                                 storage_order=storage_order)


def attention_lse(q, k, v, qseg, kseg, qidx, kidx, *, causal: bool, impl: str, options: Options = Options(),
                  out_dtype=None):
  """(out, lse): attention plus the log-sum-exp of each query's scores, for merging partials."""
  return backend(impl).attention_lse(q, k, v, qseg, kseg, qidx, kidx, causal=causal, options=options,
                                     out_dtype=out_dtype)


def decode_attention(q, k_cache, v_cache, length, qseg, kseg, *, causal: bool, impl: str,
                     options: Options = Options(), platform: str | None = None):
  """T new tokens of every row over a model's KV cache of S slots, written up to `length`: one
  write position for the whole batch, the new tokens at slots [length - T, length), padding and
  every slot past `length` with segment id 0. `platform` defaults to JAX's default backend
  (off a GPU/TPU the kernels run interpreted)."""
  platform = platform or jax.default_backend()
  return backend(impl, platform).decode_attention(q, k_cache, v_cache, length, qseg, kseg, causal=causal,
                                                  options=options, platform=platform)


def block_sparse_kernel(impl: str, block: int) -> Callable | None:
  """The fused block-sparse kernel `impl` has for this block size on this platform, or None."""
  platform = jax.default_backend()
  return backend(impl, platform).block_sparse_kernel(block, platform)
