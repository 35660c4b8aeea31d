"""Model-level remat (`model.remat`) and scanned blocks (`model.scan_blocks`).

References: the same model run block by block with no checkpointing. Remat and the scan
change what is kept and how the program is laid out, never what is computed, so losses,
gradients, updated running statistics and evaluation logits must equal the reference's
to float rounding. Memory and program size are checked on compiled / lowered programs
(deterministic on CPU), never by timing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import mixers, remat
from layers.functional import FunctionalModel
from layers.models import ModelSpec, build_model
from tests.helpers import train, train_losses
from trainer.steps import cross_entropy

T = 16


def _spec(mixer_names, *, kind="lm", t=T, d=32, **kw) -> ModelSpec:
  base = dict(kind=kind, vocab_size=40, num_classes=40 if kind == "lm" else 3, max_len=t, mixers=tuple(mixer_names),
              d_model=d, num_heads=4, num_kv_heads=4, mlp_ratio=2, mlp="gelu", norm="rmsnorm", positions="rope",
              dropout=0.1, pooling="mean", tie_embeddings=True, dtype="float32")
  base.update(kw)
  return ModelSpec(**base)


def _batch(kind, t=T, b=2):
  r = np.random.default_rng(0)
  seg = np.ones((b, t), np.int32)
  seg[-1, t - 3:] = 0  # padding at the end of the last row
  batch = {"inputs": jnp.asarray(r.integers(1, 40, (b, t)) * seg, jnp.int32), "segment_ids": jnp.asarray(seg),
           "positions": jnp.asarray(np.tile(np.arange(t), (b, 1)) * seg)}
  if kind == "lm":
    batch.update(targets=jnp.asarray(r.integers(1, 40, (b, t)), jnp.int32), weights=jnp.asarray(seg, jnp.float32))
  else:
    batch["label"] = jnp.asarray(r.integers(0, 3, (b,)), jnp.int32)
  return batch


@functools.lru_cache(maxsize=None)
def _train_and_eval(spec: ModelSpec, evaluate: bool = True):
  """(loss, grads, new extra state, eval logits or None) of one training call with dropout and a step."""
  fm = FunctionalModel(build_model(spec, seed=0))
  batch = _batch(spec.kind, spec.max_len)

  def loss(params, extra):
    logits, aux, new_extra = fm.apply(params, extra, batch, dropout_rng=jax.random.key(1), training=True,
                                      step=jnp.int32(3))
    targets, weights = fm.targets_and_weights(batch)
    nll, _, count = cross_entropy(logits, targets, weights)
    return nll / count + aux, new_extra

  (value, new_extra), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(fm.init_params(), fm.init_extra())
  if not evaluate:
    return value, grads, new_extra, None
  logits = jax.jit(lambda p, e: fm.apply(p, e, batch, step=jnp.int32(3))[0])(fm.init_params(), fm.init_extra())
  return value, grads, new_extra, logits


def _assert_same(got, want, atol=2e-6):
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
  assert sorted(got[1]) == sorted(want[1])
  for name in want[1]:
    np.testing.assert_allclose(np.asarray(got[1][name]), np.asarray(want[1][name]), atol=atol, err_msg=name)
  assert sorted(got[2]) == sorted(want[2])
  for name in want[2]:
    np.testing.assert_allclose(np.asarray(got[2][name]), np.asarray(want[2][name]), atol=atol, err_msg=name)
  if want[3] is not None:
    np.testing.assert_allclose(np.asarray(got[3]), np.asarray(want[3]), atol=atol)


@pytest.mark.parametrize("policy", [p for p in remat.CHOICES if p != "none"])
def test_every_remat_policy_gives_the_same_step(policy):
  """Loss, gradients, BatchNorm-style running statistics (prepbn norms, lmu's own) and
  evaluation logits of a mixed model with dropout, run unrolled and with its two stretches
  scanned, equal the unchecked unrolled model's."""
  names = ("attention", "attention", "lmu", "lmu")
  kw = dict(norm="prepbn", norm_options=(("r0", 1.0), ("total_steps", 10), ("warmup_steps", 0)))
  want = _train_and_eval(_spec(names, **kw))
  assert want[2], "the model has running statistics to compare"
  _assert_same(_train_and_eval(_spec(names, remat=policy, **kw)), want)
  scanned = _spec(names, remat=policy, scan_blocks=True, **kw)
  assert build_model(scanned, seed=0).encoder._runs() == [(0, 2), (2, 4)]  # noqa: SLF001
  _assert_same(_train_and_eval(scanned), want)


SCANNABLE = sorted(n for n, cls in mixers.MIXERS.items() if not cls.LAYER_INDEXED)


@pytest.mark.parametrize("name", SCANNABLE)
def test_scanned_blocks_equal_unrolled_blocks(name):
  """Two layers of `name` as one lax.scan (with full remat inside) give the unrolled
  model's loss and gradients (evaluation through the scan: the remat policy test)."""
  kind = "classify" if name == "linformer" else "lm"  # linformer is bidirectional only
  want = _train_and_eval(_spec((name,) * 2, kind=kind), evaluate=False)
  spec = _spec((name,) * 2, kind=kind, scan_blocks=True, remat="full")
  assert build_model(spec, seed=0).encoder._runs() == [(0, 2)]  # noqa: SLF001 - really one scanned stretch
  _assert_same(_train_and_eval(spec, evaluate=False), want)


def test_layer_indexed_mixers_are_not_scanned_and_must_not_be(monkeypatch):
  """A mixer that depends on its layer stays unrolled, around scanned stretches of others;
  scanning it anyway (flag removed) would run every layer as the first and change the
  result, which is why the flag exists."""
  spec = _spec(("performer", "performer", "attention", "attention", "performer"), scan_blocks=True)
  assert build_model(spec, seed=0).encoder._runs() == [(0, 1), (1, 2), (2, 4), (4, 5)]  # noqa: SLF001
  want = _train_and_eval(_spec(("performer",) * 2, scan_blocks=False), evaluate=False)
  monkeypatch.setattr(mixers.MIXERS["performer"], "LAYER_INDEXED", False)
  wrong = _train_and_eval.__wrapped__(_spec(("performer",) * 2, scan_blocks=True), evaluate=False)
  assert abs(float(wrong[0]) - float(want[0])) > 1e-4


def test_scanned_program_does_not_grow_with_depth():
  """The lowered train program of 8 scanned layers is about as large as that of 2 (one block
  inside a loop); unrolled, it grows with every layer."""

  def size(layers, scan):
    fm = FunctionalModel(build_model(_spec(("attention",) * layers, scan_blocks=scan), seed=0))
    batch = _batch("lm")

    def loss(params):
      logits, _, _ = fm.apply(params, {}, batch, training=True)
      targets, weights = fm.targets_and_weights(batch)
      return cross_entropy(logits, targets, weights)[0]

    return len(jax.jit(jax.grad(loss)).lower(fm.init_params()).as_text())

  scanned, unrolled = (size(2, True), size(8, True)), (size(2, False), size(8, False))
  assert scanned[1] < 1.3 * scanned[0], scanned
  assert unrolled[1] > 2.5 * unrolled[0], unrolled


def test_remat_lowers_compiled_temporaries_at_4k():
  """Compile only, T=4096, flash attention, three scanned layers: the train step's temporaries
  fall from `none` to `dots_no_batch` to `full`, and `full` holds less than half of what the
  unrolled, unchecked model holds. (`dots` keeps every product's output, flash's blockwise
  scores included, so it holds more than `none` here; layers/remat.py says so.) The last
  assertion also guards the scan against hoisting attention's masks for every pair of blocks
  out of the loop, which made the scanned model hold ~[T, T] (see Encoder._scan)."""
  t = 4096

  def temp(policy, scan=True):
    spec = _spec(("attention",) * 3, t=t, d=64, dropout=0.0, remat=policy, scan_blocks=scan, attention_impl="flash")
    fm = FunctionalModel(build_model(spec, seed=0))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch("lm", t=t, b=1))

    def loss(params, batch):
      logits, _, _ = fm.apply(params, {}, batch, training=True)
      targets, weights = fm.targets_and_weights(batch)
      return cross_entropy(logits, targets, weights)[0]

    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fm.init_params())
    return jax.jit(jax.grad(loss)).lower(params, batch).compile().memory_analysis().temp_size_in_bytes

  sizes = {p: temp(p) for p in ("none", "dots_no_batch", "full")}
  unrolled = temp("none", scan=False)
  assert sizes["none"] > sizes["dots_no_batch"] > sizes["full"], sizes
  assert sizes["full"] < unrolled / 2, (sizes, unrolled)


def test_trainer_with_scan_and_remat_logs_the_same_losses(tmp_path):
  """Through the config: three scanned layers with remat, on a data x FSDP x sequence mesh with
  ring attention, log the losses of three unrolled layers on the 8-way data-parallel mesh (the
  reductions' order differs: fp32 rounding)."""
  plain, fast = str(tmp_path / "plain"), str(tmp_path / "fast")
  common = ["--config.log_every=1", "--config.model.num_layers=3", "--config.total_steps=3", "--config.eval_every=0",
            "--config.keep_best=false"]
  assert train(plain, *common) == 0
  assert train(fast, *common, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.sequence=2",
               "--config.parallel.sequence_strategy=ring", "--config.model.scan_blocks=true",
               "--config.model.remat=full") == 0
  want, got = train_losses(plain), train_losses(fast)
  assert sorted(got) == sorted(want) == [1, 2, 3]
  np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)], rtol=1e-5)


def test_remat_and_scan_may_change_when_a_run_resumes():
  """Neither changes what is trained, so a resumed run may switch them (no config-change refusal)."""
  from trainer.experiment import config_changes

  saved = {"model": {"remat": "none", "scan_blocks": False, "d_model": 32}}
  assert config_changes(saved, {"model": {"remat": "full", "scan_blocks": True, "d_model": 32}}) == {}
  assert config_changes(saved, {"model": {"remat": "full", "scan_blocks": True, "d_model": 64}}) == {
      "model.d_model": (32, 64)}


def test_flops_per_step_count_every_scanned_layer(tmp_path):
  """XLA counts a loop body once; the reported FLOPs per step (hence MFU) of a scanned model are
  scaled back to all its layers: within 10% of the unrolled model's on the 8-device mesh
  (uncorrected, the count was 2.9x too low). The scale comes from the global lowered programs,
  not the per-device compiled ones, so it is an estimate (4.6% high here, 1.2% on one device)."""
  from trainer.config import load_config
  from trainer.experiment import Experiment

  flops = {}
  for scan in ("false", "true"):
    cfg = load_config("configs/default.py:smoke", ["model.num_layers=4", "model.d_model=128", "task.seq_len=128",
                                                   f"model.scan_blocks={scan}"])
    exp = Experiment(cfg, str(tmp_path / scan), read_only=True)
    flops[scan] = exp.compile_stats()["flops_per_step"]
  assert flops["false"] > 0 and flops["true"] == pytest.approx(flops["false"], rel=0.10), flops
