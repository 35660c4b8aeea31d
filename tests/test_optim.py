"""The optimizer's weight-decay mask: matrices decayed; biases, norm scales and parameters
declared `weight_decay=False` (Mamba's A_log, Swin's relative position bias) left alone."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from layers.functional import FunctionalModel
from layers.models import ModelSpec, build_model
from trainer import optim


def _model(mixers):
  spec = ModelSpec(kind="lm", vocab_size=40, num_classes=40, max_len=16, mixers=mixers, d_model=32, num_heads=4,
                   num_kv_heads=4, mlp_ratio=2, mlp="swiglu", norm="rmsnorm", positions="rope", dropout=0.0,
                   pooling="mean", tie_embeddings=True, dtype="float32", mixer_options=(), attention_impl="xla")
  return FunctionalModel(build_model(spec, seed=0))


def test_decay_mask_spares_declared_parameters_biases_and_scales():
  fm = _model(("mamba", "swin"))
  params = fm.init_params()
  mask = optim.decay_mask(params, fm.no_decay)
  assert fm.no_decay == {"encoder/blocks/0/mixer/forward_ssm/a_log", "encoder/blocks/1/mixer/relative_bias"}
  assert not any(mask[n] for n in fm.no_decay)
  assert all(params[n].ndim == 2 for n in fm.no_decay)  # matrices by rank: only the declaration spares them
  assert mask["encoder/blocks/0/mixer/in_proj/kernel"] and mask["encoder/blocks/1/mixer/query/kernel"]
  assert not mask["encoder/blocks/0/mixer/forward_ssm/dt_bias"] and not mask["encoder/final_norm/scale"]
  assert optim.decay_mask(params)["encoder/blocks/0/mixer/forward_ssm/a_log"]  # the rank rule alone would decay it


def test_adamw_step_with_zero_gradients_decays_only_the_masked_parameters():
  fm = _model(("mamba",))
  params = fm.init_params()
  cfg = ml_collections.ConfigDict(dict(learning_rate=0.1, warmup_steps=0, schedule="constant", end_lr_ratio=0.0,
                                       b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.5, grad_clip=0.0))
  tx = optim.make_optimizer(cfg, 10, params, skip_nonfinite=False, no_decay=fm.no_decay)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  a_log = "encoder/blocks/0/mixer/forward_ssm/a_log"
  np.testing.assert_array_equal(np.asarray(updates[a_log]), 0.0)
  kernel = "encoder/blocks/0/mixer/in_proj/kernel"
  np.testing.assert_allclose(np.asarray(updates[kernel]), -0.1 * 0.5 * np.asarray(params[kernel]), rtol=1e-6)
