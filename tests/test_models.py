"""Heads and the mixer interface: padding invariance, aux losses, extra state."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import mixers
from layers.functional import FunctionalModel
from layers.mixer_base import add_aux_loss
from layers.models import ModelSpec, build_model


def _spec(kind, **kw):
  base = dict(kind=kind, vocab_size=20, num_classes=3, max_len=24, mixers=("attention",) * 2, d_model=16,
              num_heads=2, num_kv_heads=2, mlp_ratio=2, mlp="gelu", norm="layernorm", positions="rope", dropout=0.0,
              pooling="mean", tie_embeddings=True, dtype="float32")
  base.update(kw)
  return ModelSpec(**base)


def _row(ids, t):
  n = len(ids)
  pad = t - n
  return (np.array([ids + [0] * pad], np.int32), np.array([[1] * n + [0] * pad], np.int32),
          np.array([list(range(n)) + [0] * pad], np.int32))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_classifier_ignores_padding(pooling, positions):
  model = build_model(_spec("classify", pooling=pooling, positions=positions), seed=0)
  ids = [3, 7, 1, 9, 4]
  outs = []
  for t in (5, 9, 24):
    x, seg, pos = _row(ids, t)
    outs.append(np.asarray(model({"inputs": x, "segment_ids": seg, "positions": pos})))
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
  np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)


def test_dual_encoder_ignores_padding_and_depends_on_both_inputs():
  model = build_model(_spec("match"), seed=0)

  def run(a, b, t):
    x, s, p = _row(a, t)
    x2, s2, p2 = _row(b, t)
    return np.asarray(model({"inputs": x, "segment_ids": s, "positions": p, "inputs2": x2, "segment_ids2": s2,
                             "positions2": p2}))
  base = run([1, 2, 3], [4, 5, 6, 7], 8)
  np.testing.assert_allclose(base, run([1, 2, 3], [4, 5, 6, 7], 16), atol=1e-5)
  assert np.abs(base - run([1, 2, 3], [4, 5, 6, 8], 8)).max() > 1e-4
  assert np.abs(base - run([1, 2, 9], [4, 5, 6, 7], 8)).max() > 1e-4


class _SowingAttention(mixers.MIXERS["attention"]):
  """Exact attention that also sows an auxiliary loss and counts calls in a BatchStat."""

  def __init__(self, spec, *, rngs):
    super().__init__(spec, rngs=rngs)
    self.calls = nnx.BatchStat(jnp.zeros((), jnp.float32))

  def __call__(self, x, ctx):
    y = super().__call__(x, ctx)
    add_aux_loss(self, 0.25 * jnp.mean(jnp.square(y)))
    if ctx.training:
      self.calls[...] = self.calls[...] + 1.0
    return y


def test_aux_losses_and_extra_state_flow_through_apply(monkeypatch):
  monkeypatch.setitem(mixers.MIXERS, "sowing", _SowingAttention)
  fm = FunctionalModel(build_model(_spec("lm", mixers=("sowing", "attention", "sowing")), seed=0))
  params, extra = fm.init_params(), fm.init_extra()
  assert sorted(extra) == ["encoder/blocks/0/mixer/calls", "encoder/blocks/2/mixer/calls"]
  x, seg, pos = _row([1, 2, 3, 4], 6)
  batch = {"inputs": x, "segment_ids": seg, "positions": pos}
  _, aux, new_extra = fm.apply(params, extra, batch, training=True)
  # The sown value is recomputed independently from the two sowing layers' outputs.
  model = fm.module(params, extra)
  hs = model.encoder.embed(x, jnp.float32)
  want = 0.0
  for i, block in enumerate(model.encoder.blocks):
    from layers.mixers import MixContext
    y = block.mixer(block.norm_mixer(hs), MixContext(segment_ids=seg, positions=pos))
    if i in (0, 2):
      want += 0.25 * float(jnp.mean(jnp.square(y)))
    hs = block(hs, MixContext(segment_ids=seg, positions=pos))
  assert float(aux) == pytest.approx(want, rel=1e-5)
  assert all(float(v) == 1.0 for v in new_extra.values())
  _, _, eval_extra = fm.apply(params, extra, batch, training=False)
  assert all(float(v) == 0.0 for v in eval_extra.values())


def test_scored_positions_give_the_dense_loss_and_gradients():
  """An LM batch that names its loss positions (`score_positions`, MQAR's queries) computes
  logits there only; loss, accuracy and gradients equal the dense [B, T, V] computation,
  also when rows are stored permuted (zigzag) and the positions remapped by the pipeline."""
  import jax

  from trainer import steps
  from trainer.data.mqar import MQAR
  from trainer.data.pipeline import permute_rows
  from parallel.sequence import zigzag_permutation
  task = MQAR(seq_len=64, seed=0, vocab_size=128, num_pairs=8)
  batch = task.batch("train", np.arange(4))
  assert batch["score_positions"].shape == (4, 8)
  np.testing.assert_array_equal(np.take_along_axis(batch["weights"], batch["score_positions"], 1), 1.0)
  fm = FunctionalModel(build_model(_spec("lm", vocab_size=128, num_classes=128, max_len=64), seed=0))
  params, extra = fm.init_params(), fm.init_extra()

  def loss(params, batch):
    logits, _, _ = fm.apply(params, extra, batch)
    nll, correct, count = steps.cross_entropy(logits, *fm.targets_and_weights(batch))
    return nll / count, (correct / count, logits.shape)

  dense = {k: v for k, v in batch.items() if k != "score_positions"}
  perm = zigzag_permutation(64, 2)
  cases = {"scored": batch, "scored+zigzag": permute_rows(batch, perm)}
  run = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (want, (acc_want, shape_want)), g_want = run(params, dense)
  assert shape_want == (4, 64, 128)
  for name, b in cases.items():
    (got, (acc, shape)), g = run(params, b)
    assert shape == (4, 8, 128), name
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(float(acc), float(acc_want), err_msg=name)
    for k in g_want:
      np.testing.assert_allclose(np.asarray(g[k]), np.asarray(g_want[k]), atol=1e-6, rtol=1e-4, err_msg=f"{name} {k}")


def test_block_without_mlp_is_the_reference_mamba_block():
  """`mlp="none"`: each block is x + mixer(rmsnorm(x)) (the reference Mamba model's block), no
  MLP parameters exist, and the LM's logits equal that recurrence written out by hand."""
  from layers.mixers import MixContext

  model = build_model(_spec("lm", mixers=("mamba", "mamba"), mlp="none", norm="rmsnorm"), seed=0)
  names = sorted(FunctionalModel(model).init_params())
  assert not [n for n in names if "mlp" in n], names
  x_ids, seg, pos = _row([3, 7, 1, 9, 4, 2], 8)
  got = np.asarray(model({"inputs": x_ids, "segment_ids": seg, "positions": pos}))

  def rms(norm, h):
    return h / np.sqrt(np.mean(np.square(h), axis=-1, keepdims=True) + 1e-6) * np.asarray(norm.scale[...])

  h = np.asarray(model.encoder.embed(x_ids, jnp.float32))
  for block in model.encoder.blocks:
    h = h + np.asarray(block.mixer(jnp.asarray(rms(block.norm_mixer, h)), MixContext(segment_ids=seg, positions=pos)))
  h = rms(model.encoder.final_norm, h)
  table = np.asarray(model.encoder.embed.embedding[...])
  want = h @ table.T / np.sqrt(table.shape[1])  # tied head: logits scaled by 1/sqrt(D)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
