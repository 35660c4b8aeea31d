"""The train and eval steps: pure functions of (state, batch), jitted by the caller.

State is a dict of flat dicts and scalars: params, extra (non-param model state such as
BatchNorm statistics), opt_state, step, rng. Loss is the weighted cross-entropy over
whatever the model's head names as targets and weights, plus sown auxiliary losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from layers.functional import FunctionalModel


def cross_entropy(logits, targets, weights):
  """Sum of weighted token losses, correct predictions and weights (fp32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  # Zero-weight rows (padding, a finite split's fillers) are dropped, not multiplied by 0:
  # a non-finite logit there must not turn the sums into NaN.
  real = weights > 0
  return (jnp.sum(jnp.where(real, nll * weights, 0.0)), jnp.sum(jnp.where(real, correct * weights, 0.0)),
          jnp.sum(weights))


def make_train_step(fm: FunctionalModel, tx: optax.GradientTransformation, lr_schedule):

  def loss_fn(params, extra, batch, rng, step):
    logits, aux, new_extra = fm.apply(params, extra, batch, dropout_rng=rng, training=True, step=step)
    targets, weights = fm.targets_and_weights(batch)
    nll_sum, correct, count = cross_entropy(logits, targets, weights)
    denom = jnp.maximum(count, 1.0)
    loss = nll_sum / denom + aux
    return loss, (new_extra, {"loss": nll_sum / denom, "accuracy": correct / denom, "aux_loss": aux,
                              "weight_sum": count})

  def train_step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    grads, (new_extra, metrics) = jax.grad(loss_fn, has_aux=True)(state["params"], state["extra"], batch, rng, state["step"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    metrics["learning_rate"] = lr_schedule(state["step"])
    if isinstance(opt_state, optax.ApplyIfFiniteState):  # on_nonfinite=skip
      metrics["skipped"] = 1.0 - opt_state.last_finite.astype(jnp.float32)
      metrics["consecutive_skipped"] = opt_state.notfinite_count.astype(jnp.float32)
      metrics["skipped_steps"] = opt_state.total_notfinite.astype(jnp.float32)
    new_state = dict(state, params=params, extra=new_extra, opt_state=opt_state, step=state["step"] + 1)
    return new_state, metrics

  return train_step


def make_eval_step(fm: FunctionalModel):

  def eval_step(state, batch):
    logits, _, _ = fm.apply(state["params"], state["extra"], batch, step=state["step"])
    targets, weights = fm.targets_and_weights(batch)
    nll_sum, correct, count = cross_entropy(logits, targets, weights)
    return {"nll_sum": nll_sum, "correct": correct, "count": count}

  return eval_step
