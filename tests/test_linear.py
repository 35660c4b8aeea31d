"""Linear attention (layers/linear/core.py) and the Linear Transformer mixer.

The chunk-parallel form equals the naive O(T^2) masked form and the token-by-token
recurrence (values and gradients), with padding and packed segments, causal and
bidirectional; decode equals the full forward; the sequence-parallel scan equals one
device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from layers.linear.core import (linear_attention, recurrent_linear_attention, reference_linear_attention)
from layers.linear.linear import LinearTransformer
from layers.mixer_base import MixContext, MixerSpec, use_sequence_parallel
from parallel import mesh as mesh_lib
from parallel.sequence import SequenceParallel


def _inputs(b=2, t=37, n=2, f=5, h=3, seed=0):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.uniform(0.1, 1.0, (b, t, n, f)), jnp.float32)
  k = jnp.asarray(r.uniform(0.1, 1.0, (b, t, n, f)), jnp.float32)
  v = jnp.asarray(r.normal(size=(b, t, n, h)), jnp.float32)
  seg = np.ones((b, t), np.int32)
  seg[0, t // 2:] = 2  # two packed examples ...
  seg[0, t - 6:] = 0  # ... then padding
  seg[1, t - 3:] = 0
  return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("chunk,normalize", [(1, True), (8, True), (64, True), (8, False)],
                         ids=["chunk1", "chunk8", "one-chunk", "chunk8-raw"])
def test_chunked_equals_naive_masked_form(causal, normalize, chunk):
  q, k, v, seg = _inputs()
  got = linear_attention(q, k, v, seg, causal=causal, normalize=normalize, chunk=chunk)[0]
  want = reference_linear_attention(q, k, v, seg, causal=causal, normalize=normalize)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalised", "raw"])
def test_causal_recurrence_equals_naive_masked_form(normalize):
  q, k, v, seg = _inputs(seed=1)
  got = recurrent_linear_attention(q, k, v, seg, normalize=normalize)
  want = reference_linear_attention(q, k, v, seg, causal=True, normalize=normalize)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_gradients_equal_naive_masked_form(causal):
  q, k, v, seg = _inputs(seed=2)
  w = jax.random.normal(jax.random.key(0), v.shape)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * w)
  chunked = lambda q, k, v: linear_attention(q, k, v, seg, causal=causal, chunk=8)[0]
  naive = lambda q, k, v: reference_linear_attention(q, k, v, seg, causal=causal)
  got = jax.grad(loss(chunked), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(naive), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_segments_do_not_interact_and_padding_is_inert():
  q, k, v, seg = _inputs(seed=3)
  out = linear_attention(q, k, v, seg, causal=False)[0]
  # perturb example 2 of row 0 and the padding: example 1 of row 0 is unchanged
  t = seg.shape[1]
  v2 = v.at[0, t // 2:].add(5.0)
  k2 = k.at[0, t // 2:].multiply(3.0)
  out2 = linear_attention(q, k2, v2, seg, causal=False)[0]
  np.testing.assert_allclose(out2[0, :t // 2], out[0, :t // 2], rtol=1e-6)
  assert not np.allclose(out2[0, t // 2:t - 6], out[0, t // 2:t - 6])
  np.testing.assert_array_equal(out[0, t - 6:], 0.0)


def test_decode_in_pieces_equals_one_pass_and_padding_keeps_the_run():
  q, k, v, seg = _inputs(seed=4)
  attend = jax.jit(lambda q, k, v, seg, state: linear_attention(q, k, v, seg, causal=True, chunk=8, state=state))
  full = attend(q, k, v, seg, None)[0]
  out, state = attend(q[:, :10], k[:, :10], v[:, :10], seg[:, :10], None)
  outs = [out]
  for i in range(10, seg.shape[1]):
    sl = slice(i, i + 1)
    out, state = attend(q[:, sl], k[:, sl], v[:, sl], seg[:, sl], state)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-6)
  # a right-padded prompt then a token of the same example continues that example
  seg_p = jnp.asarray([[1, 1, 1, 0, 0]])
  qq, kk, vv = q[:1, :5], k[:1, :5], v[:1, :5]
  _, st = linear_attention(qq, kk, vv, seg_p, causal=True)
  nxt = linear_attention(q[:1, 5:6], k[:1, 5:6], v[:1, 5:6], jnp.asarray([[1]]), causal=True, state=st)[0]
  ref_seg = jnp.asarray([[1, 1, 1, 1]])
  cat = lambda a, b: jnp.concatenate([a[:, :3], b], axis=1)
  want = reference_linear_attention(cat(qq, q[:1, 5:6]), cat(kk, k[:1, 5:6]), cat(vv, v[:1, 5:6]), ref_seg,
                                    causal=True)
  np.testing.assert_allclose(nxt[:, 0], want[:, 3], rtol=1e-5)


def _spec(causal, **options):
  return MixerSpec(d_model=16, num_heads=2, num_kv_heads=2, causal=causal, positions="none", layer_index=0,
                   num_layers=2, max_len=64, options=tuple(sorted(options.items())))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_mixer_equals_elu_plus_one_reference(causal):
  mixer = LinearTransformer(_spec(causal, chunk=4), rngs=nnx.Rngs(0))
  r = np.random.default_rng(5)
  x = jnp.asarray(r.normal(size=(2, 23, 16)), jnp.float32)
  seg = jnp.asarray(np.r_[[1] * 11 + [2] * 9 + [0] * 3, [1] * 20 + [0] * 3].reshape(2, 23), jnp.int32)
  ctx = MixContext(segment_ids=seg, positions=jnp.zeros_like(seg))

  def ref(m, x):
    q, k, v = m.query(x), m.key(x), m.value(x)
    phi = lambda z: jnp.where(z > 0, z + 1.0, jnp.exp(z))  # elu(z) + 1, written out
    return m.out(reference_linear_attention(phi(q), phi(k), v, seg, causal=causal))

  np.testing.assert_allclose(mixer(x, ctx), ref(mixer, x), rtol=1e-5, atol=1e-5)
  graph, params = nnx.split(mixer, nnx.Param)
  loss = lambda fn: lambda p, x: jnp.sum(jnp.sin(fn(nnx.merge(graph, p), x)))
  g_got = jax.jit(jax.grad(loss(lambda m, x: m(x, ctx)), argnums=(0, 1)))(params, x)
  g_want = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mixer_prefill_then_decode_equals_full_forward():
  mixer = LinearTransformer(_spec(True, chunk=4), rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (2, 13, 16))
  seg = jnp.asarray([[1] * 6 + [2] * 7, [1] * 13], jnp.int32)
  full = mixer(x, MixContext(segment_ids=seg, positions=jnp.zeros_like(seg)))
  mixer.init_cache(2, 13, jnp.float32)
  ctx = lambda sl: MixContext(segment_ids=seg[:, sl], positions=jnp.zeros_like(seg[:, sl]), decode=True)
  outs = [mixer(x[:, :5], ctx(slice(0, 5)))]
  outs += [mixer(x[:, i:i + 1], ctx(slice(i, i + 1))) for i in range(5, 13)]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_bidirectional_mixer_refuses_decode():
  with pytest.raises(ValueError, match="bidirectional"):
    LinearTransformer(_spec(False), rngs=nnx.Rngs(0)).init_cache(1, 8, jnp.float32)


RULES = (("batch", ("data", "fsdp")), ("length", "sequence"), ("heads", "tensor"), ("head_dim", None))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 1, 1, 4), (1, 1, 2, 4)], ids=lambda s: "x".join(map(str, s)))
def test_sequence_parallel_scan_equals_one_device(shape, causal):
  """Chunks of 8 tokens per device; segments and padding cross device boundaries."""
  mesh = mesh_lib.make_mesh(ConfigDict(dict(zip(("data", "fsdp", "tensor", "sequence"), shape))))
  r = np.random.default_rng(6)
  b, t, n, f, h = 2, 64, 2, 5, 3
  q = r.uniform(0.1, 1.0, (b, t, n, f)).astype(np.float32)
  k = r.uniform(0.1, 1.0, (b, t, n, f)).astype(np.float32)
  v = r.normal(size=(b, t, n, h)).astype(np.float32)
  seg = np.ones((b, t), np.int32)
  seg[0, 5:30] = 2  # a segment spanning four devices
  seg[0, 30:45] = 3
  seg[0, 45:] = 0  # padding over the last devices
  seg[1, 8:16] = 0  # a whole device of padding inside a run: the run continues across it
  sp = SequenceParallel(mesh, RULES, "scan")
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  tok = P(("data", "fsdp") if shape[0] > 1 else None, "sequence")
  act = P(tok[0], "sequence", "tensor" if shape[2] > 1 else None, None)
  w = r.normal(size=(b, t, n, h)).astype(np.float32)

  def sharded(q, k, v):
    return sp.linear_attention(q, k, v, seg_d, causal=causal, normalize=True, eps=1e-6, chunk=4)

  seg_d = put(seg, tok)
  args = [put(x, act) for x in (q, k, v)]
  got = jax.jit(sharded)(*args)
  want = reference_linear_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg),
                                    causal=causal)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  g_got = jax.jit(jax.grad(lambda *a: jnp.sum(sharded(*a) * w), argnums=(0, 1, 2)))(*args)
  g_want = jax.grad(lambda *a: jnp.sum(reference_linear_attention(*a, jnp.asarray(seg), causal=causal) * w),
                    argnums=(0, 1, 2))(*map(jnp.asarray, (q, k, v)))
  for a, b_ in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-5)


def test_mixer_under_sequence_parallel_scan_equals_unsharded():
  mesh = mesh_lib.make_mesh(ConfigDict(dict(data=1, fsdp=1, tensor=1, sequence=8)))
  mixer = LinearTransformer(_spec(True, chunk=4), rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (2, 32, 16))
  seg = jnp.asarray([[1] * 20 + [2] * 12, [1] * 28 + [0] * 4], jnp.int32)
  ctx = MixContext(segment_ids=seg, positions=jnp.zeros_like(seg))
  want = mixer(x, ctx)
  sp = SequenceParallel(mesh, RULES, "scan")

  @jax.jit
  def run(x, seg):
    with use_sequence_parallel(sp):
      return mixer(x, MixContext(segment_ids=seg, positions=jnp.zeros_like(seg)))

  got = run(jax.device_put(x, NamedSharding(mesh, P(None, "sequence", None))),
            jax.device_put(seg, NamedSharding(mesh, P(None, "sequence"))))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
