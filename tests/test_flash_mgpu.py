"""The Hopper (Mosaic GPU) flash forward of kernels/flash_mgpu.py against the dense reference.

On CPU the kernel runs in Pallas's GPU interpret mode: its three warpgroups, TMA copies and
barriers are simulated (a barrier phase that no thread waits on is an error there), and only
the two matrix products are plain dots instead of wgmma (see the module docstring). The wgmma
variant is checked by lowering it to Mosaic GPU, which validates every register layout. On a
GPU (scripts/gpu_check.sh) the same tests run the compiled kernel. Gradients run through the
Triton-lowered backward kernels of kernels/flash_pallas.py, fed by this forward's out and lse.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import flash_mgpu
from kernels.flash_pallas import Tiling, default_tiling, flash_attention_pallas, flash_attention_pallas_lse
from tests.helpers import values_and_grads
from tests.kernel_checks import attention_case, check_rel
from tests.test_kernels import _dense, _dense_with_lse

pytestmark = pytest.mark.skipif(not flash_mgpu.available(), reason="this jax has no Mosaic GPU Pallas backend")

# 128 query rows per program (2 consumer warpgroups x 64); small backward tiles as in test_kernels.
MGPU = Tiling(block_q=128, block_k=64, block_q_dkv=32, block_k_dkv=16, block_q_dq=16, block_k_dq=32, num_stages=2,
              forward="mgpu")


@pytest.mark.parametrize("causal,case,h", [(True, "gqa_segments_odd", 64), (False, "gqa_segments_odd", 64),
                                           (True, "mha_aligned", 128), (False, "mha_aligned", 128)])
def test_values_lse_and_gradients_match_dense_reference(causal, case, h):
  """bf16; GQA with packed segments and a length (150) that pads to two 128-row programs and
  three 64-row key tiles, or an aligned 256 with no segment ids (the unmasked path); out, lse and
  gradients through both."""
  if case == "gqa_segments_odd":
    q, k, v, seg = attention_case(b=2, t=150, n=4, kv=2, h=h, dtype=jnp.bfloat16, seed=1 + causal)
  else:
    q, k, v, seg = attention_case(b=1, t=256, n=2, kv=2, h=h, dtype=jnp.bfloat16, seed=3 + causal, segments=False)
  b, t, n, _ = q.shape
  if seg is None:
    seg = np.ones((b, t), np.int32)
  r = np.random.default_rng(7)
  w_o, w_l = jnp.asarray(r.normal(size=q.shape), jnp.float32), jnp.asarray(r.normal(size=(b, t, n)), jnp.float32)
  pick_seg = (lambda s: s) if case == "gqa_segments_odd" else (lambda s: None)
  mgpu = lambda q, k, v: flash_attention_pallas_lse(q, k, v, pick_seg(seg), pick_seg(seg), causal=causal,
                                                    tiling=MGPU)
  (out, lse), grads = values_and_grads(mgpu, q, k, v, w_o, w_l)
  (out_r, lse_r), grads_r = values_and_grads(
      lambda q, k, v: _dense_with_lse(*(x.astype(jnp.float32) for x in (q, k, v)), seg, causal), q, k, v, w_o, w_l)
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape and lse.shape == (b, t, n)
  check_rel("out", out, out_r, jnp.bfloat16)
  np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(lse_r)))
  fin = np.isfinite(np.asarray(lse_r))
  check_rel("lse", np.asarray(lse)[fin], np.asarray(lse_r)[fin], jnp.bfloat16)
  for name, a, b_ in zip("qkv", grads, grads_r):
    check_rel(f"d{name} (through out and lse)", a, b_, jnp.bfloat16)
  pad = seg == 0  # padding rows see nothing: exactly zero output
  assert np.all(np.asarray(out, np.float32)[pad] == 0)


def test_same_as_the_triton_forward():
  """The two forwards of one call site agree (same padded inputs, same contract)."""
  q, k, v, seg = attention_case(b=1, t=200, n=2, kv=1, h=64, dtype=jnp.bfloat16, seed=5)
  triton = dataclasses.replace(MGPU, block_q=32, forward="triton")
  for causal in (True, False):
    o1, l1 = flash_attention_pallas_lse(q, k, v, seg, seg, causal=causal, tiling=MGPU)
    o2, l2 = flash_attention_pallas_lse(q, k, v, seg, seg, causal=causal, tiling=triton)
    check_rel(f"out causal={causal}", o1, o2, jnp.bfloat16)
    fin = np.isfinite(np.asarray(l2))
    check_rel(f"lse causal={causal}", np.asarray(l1)[fin], np.asarray(l2)[fin], jnp.bfloat16)


def test_causal_tiles_beyond_the_diagonal_are_never_loaded():
  """Keys 128..255 are invisible to queries 0..127. Filled with NaN they poison any tile the
  producer loads (0 * NaN = NaN in P V): a finite, correct result proves its loop stops at the
  diagonal. The bidirectional call over the same keys must load them (the probe can fail)."""
  q, k, v, _ = attention_case(b=1, t=128, s=256, n=2, kv=1, h=64, dtype=jnp.bfloat16, seed=30, segments=False)
  k, v = k.at[:, 128:].set(jnp.nan), v.at[:, 128:].set(jnp.nan)
  got = flash_attention_pallas(q, k, v, causal=True, tiling=MGPU)
  check_rel("out", got, _dense(q, k[:, :128], v[:, :128], None, True), jnp.bfloat16)
  assert not np.all(np.isfinite(np.asarray(flash_attention_pallas(q, k, v, causal=False, tiling=MGPU), np.float32)))


def _lowered(causal, seg, h, block_k, grad=False):
  b, t, n, kv = 2, 1000, 8, 2
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16)
  s = jax.ShapeDtypeStruct((b, t), jnp.int32)
  tiling = dataclasses.replace(default_tiling(h), block_q=128, block_k=block_k, num_stages=2, forward="mgpu")
  attend = lambda q, k, v, s: flash_attention_pallas(q, k, v, s if seg else None, s if seg else None,
                                                     causal=causal, tiling=tiling, interpret=False)
  f = attend
  if grad:
    f = jax.grad(lambda q, k, v, s: jnp.sum(attend(q, k, v, s).astype(jnp.float32)), argnums=(0, 1, 2))
  return jax.jit(f).trace(q, k, k, s).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("causal,seg,h,block_k", [(True, False, 128, 128), (False, True, 128, 128),
                                                  (True, True, 64, 64), (False, False, 64, 128)])
def test_wgmma_kernel_lowers_to_mosaic_gpu(causal, seg, h, block_k):
  """The compiled variant (wgmma from shared memory and from registers, in-place accumulator,
  layouts of the row statistics and masks) lowers to one Mosaic GPU kernel on any host; the
  Mosaic GPU lowering checks every register layout and shared-memory tiling here."""
  text = _lowered(causal, seg, h, block_k)
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1, text[:2000]


def test_gradient_lowers_to_the_mosaic_forward_and_triton_backward():
  text = _lowered(True, True, 128, 128, grad=True)
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1
  assert sorted(re.findall(r'name = "(flash_\w+)"', text)) == ["flash_bwd_dkv", "flash_bwd_dq"]


def test_refuses_what_it_cannot_run():
  q, k, v, seg = attention_case(b=1, t=64, n=2, kv=1, h=64, dtype=jnp.bfloat16, seed=40)
  with pytest.raises(ValueError, match="dtype=float32"):
    flash_attention_pallas(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), causal=True,
                           tiling=MGPU)
  with pytest.raises(ValueError, match="head_dim=32"):
    flash_attention_pallas(q[..., :32], k[..., :32], v[..., :32], causal=True, tiling=MGPU)
  with pytest.raises(ValueError, match="block_q=64"):
    flash_attention_pallas(q, k, v, causal=True, tiling=dataclasses.replace(MGPU, block_q=64))
  with pytest.raises(ValueError, match="q_index"):
    flash_attention_pallas(q, k, v, seg, seg, causal=True, q_index=seg, kv_index=seg, tiling=MGPU)
  with pytest.raises(ValueError, match="'cutlass'"):
    flash_attention_pallas(q, k, v, causal=True, tiling=dataclasses.replace(MGPU, forward="cutlass"))
