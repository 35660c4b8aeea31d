"""The sequence-parallel scan mechanism equals a sequential single-device scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from parallel import mesh as mesh_lib
from parallel.scan import reference_linear_recurrence, sp_linear_recurrence


@pytest.mark.parametrize("shape,spec", [
    ((1, 1, 1, 8), P(None, "sequence", None)),
    ((2, 1, 1, 4), P("data", "sequence", None)),
    ((1, 1, 2, 4), P(None, "sequence", "tensor")),
])
def test_sp_linear_recurrence_equals_sequential(shape, spec):
  mesh = mesh_lib.make_mesh(ConfigDict(dict(zip(("data", "fsdp", "tensor", "sequence"), shape))))
  r = np.random.default_rng(0)
  b, t, d = 2, 64, 6
  a = r.uniform(0.5, 1.0, size=(b, t, d)).astype(np.float32)  # decays, like Mamba's exp(delta A)
  x = r.normal(size=(b, t, d)).astype(np.float32)
  w = r.normal(size=(b, t, d)).astype(np.float32)
  put = lambda z: jax.device_put(z, NamedSharding(mesh, spec))
  f = lambda a, x: sp_linear_recurrence(a, x, mesh=mesh, spec=spec)
  got, want = jax.jit(f)(put(a), put(x)), reference_linear_recurrence(a, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # gradients flow through the gathered summaries too
  g_got = jax.jit(jax.grad(lambda a, x: jnp.sum(f(a, x) * w), argnums=(0, 1)))(put(a), put(x))
  g_want = jax.grad(lambda a, x: jnp.sum(reference_linear_recurrence(a, x) * w), argnums=(0, 1))(a, x)
  for u, v in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-4)
