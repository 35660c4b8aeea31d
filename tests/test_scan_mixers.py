"""Recurrent mixers under the "scan" sequence-parallel strategy equal one device (8 fake devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from layers.mixer_base import MixContext, MixerSpec, use_sequence_parallel
from layers.mixers import MIXERS
from parallel import mesh as mesh_lib
from parallel.sequence import SequenceParallel

RULES = (("batch", ("data", "fsdp")), ("length", "sequence"), ("heads", "tensor"), ("head_dim", None),
         ("mlp", "tensor"), ("state", None), ("embed", None))


# (linear attention's own scan is covered in test_linear.py.)
# mamba2: 4 heads of 8; with 2 groups under tensor parallelism B and C are repeated per head.
MAMBA2 = (("d_state", 4), ("head_dim", 8))


@pytest.mark.parametrize("mixer,shape,causal,options", [
    ("mamba", (1, 1, 1, 8), True, ()), ("mamba", (1, 1, 1, 8), False, ()), ("mamba", (2, 1, 2, 2), True, ()),
    ("transnormer", (2, 1, 1, 4), True, ()), ("mamba2", (2, 1, 1, 4), False, MAMBA2),
    ("mamba2", (2, 1, 2, 2), True, MAMBA2 + (("groups", 2),))],
    ids=["mamba-seq8-causal", "mamba-seq8-bidirectional", "mamba-2x1x2x2-causal", "transnormer-2x1x1x4-causal",
         "mamba2-2x1x1x4-bidirectional", "mamba2-2x1x2x2-causal-groups"])
def test_scan_strategy_equals_one_device(mixer, shape, causal, options):
  mesh = mesh_lib.make_mesh(ConfigDict(dict(zip(("data", "fsdp", "tensor", "sequence"), shape))))
  spec = MixerSpec(d_model=16, num_heads=2, num_kv_heads=2, causal=causal, positions="none", layer_index=1,
                   num_layers=2, max_len=64, options=tuple(sorted({"block": 8, "chunk": 4, **dict(options)}.items())))
  module = MIXERS[mixer](spec, rngs=nnx.Rngs(0))
  graph, params, rest = nnx.split(module, nnx.Param, ...)
  t = 32
  x = jax.random.normal(jax.random.key(1), (2, t, 16))
  seg = np.ones((2, t), np.int32)
  seg[0, 6:21] = 2  # a segment across device boundaries
  seg[0, 21:] = 3
  seg[1, 27:] = 0  # padding at the end
  seg = jnp.asarray(seg)
  w = jax.random.normal(jax.random.key(2), (2, t, 16))

  def loss(params, x, seg, sp=None):
    m = nnx.merge(graph, params, rest)
    ctx = MixContext(segment_ids=seg, positions=jnp.zeros_like(seg))
    if sp is None:
      return jnp.sum(m(x, ctx) * w), m(x, ctx)
    with use_sequence_parallel(sp):
      return jnp.sum(m(x, ctx) * w), m(x, ctx)

  (_, want), g_want = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x, seg)
  sp = SequenceParallel(mesh, RULES, "scan")
  batch = ("data", "fsdp") if shape[0] > 1 else None
  xs = jax.device_put(x, NamedSharding(mesh, P(batch, "sequence", None)))
  segs = jax.device_put(seg, NamedSharding(mesh, P(batch, "sequence")))
  fn = jax.jit(jax.value_and_grad(lambda p, x, s: loss(p, x, s, sp), argnums=(0, 1), has_aux=True))
  (_, got), g_got = fn(params, xs, segs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
