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


def _micro_batches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...], micro-batch j = rows j, j+k, j+2k, ...: each device's block
  of rows holds B/k/dp rows of every micro-batch, so the split moves no data between devices."""
  return {name: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1) for name, x in batch.items()}


def make_train_step(fm: FunctionalModel, tx: optax.GradientTransformation, lr_schedule, accum_steps: int = 1):
  """`accum_steps` = k > 1: the batch is k micro-batches of B/k rows, their gradients summed
  in one compiled step (a scan, so the program does not grow with k). The loss is normalised
  by the target weight of the whole batch, not per micro-batch, so the step equals the
  full-batch step up to float rounding, given: no dropout (drawn per micro-batch), no
  BatchNorm-style statistics in the forward pass (computed over B/k rows; the running
  statistics get one update per step, with the micro-batches' statistics averaged), and
  auxiliary losses that are means over rows (each micro-batch's counts 1/k). The gradients'
  data-parallel reduction happens once per micro-batch (one per step is not yet built)."""

  def loss_fn(params, extra, batch, rng, step, denom=None, aux_scale=1.0):
    logits, aux, new_extra = fm.apply(params, extra, batch, dropout_rng=rng, training=True, step=step)
    targets, weights = fm.targets_and_weights(batch)
    nll_sum, correct, count = cross_entropy(logits, targets, weights)
    denom = jnp.maximum(count, 1.0) if denom is None else denom
    loss = nll_sum / denom + aux * aux_scale
    return loss, (new_extra, {"nll_sum": nll_sum, "correct": correct, "count": count, "aux": aux})

  def gradients(state, batch, rng):
    """(grads, new extra, sums) of the whole batch, in one pass or accumulated over micro-batches."""
    if accum_steps == 1:
      grads, (new_extra, sums) = jax.grad(loss_fn, has_aux=True)(state["params"], state["extra"], batch, rng,
                                                                 state["step"])
      return grads, new_extra, sums
    _, weights = fm.targets_and_weights(batch)
    denom = jnp.maximum(jnp.sum(weights), 1.0)  # the whole batch's target weight

    def micro(carry, xs):
      grads_acc, sums_acc = carry
      i, mb = xs
      # Every micro-batch starts from the step's extra state (e.g. BatchNorm running statistics);
      # their k updates are averaged below: for an EMA, one update with the mean of their statistics.
      g, (extra, sums) = jax.grad(loss_fn, has_aux=True)(state["params"], state["extra"], mb,
                                                         jax.random.fold_in(rng, i), state["step"], denom,
                                                         1.0 / accum_steps)
      return (jax.tree.map(jnp.add, grads_acc, g), jax.tree.map(jnp.add, sums_acc, sums)), extra

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    sums0 = {k: jnp.zeros((), jnp.float32) for k in ("nll_sum", "correct", "count", "aux")}
    (grads, sums), extras = jax.lax.scan(
        micro, (zeros, sums0), (jnp.arange(accum_steps), _micro_batches(batch, accum_steps)))
    new_extra = jax.tree.map(
        lambda x: jnp.mean(x, axis=0).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x[-1], extras)
    sums = dict(sums, aux=sums["aux"] / accum_steps)
    return grads, new_extra, sums

  def train_step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    grads, new_extra, sums = gradients(state, batch, rng)
    denom = jnp.maximum(sums["count"], 1.0)
    metrics = {"loss": sums["nll_sum"] / denom, "accuracy": sums["correct"] / denom, "aux_loss": sums["aux"],
               "weight_sum": sums["count"]}
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    metrics["learning_rate"] = lr_schedule(state["step"])
    # Real (non-padding) input tokens of the step, for honest tokens/s.
    metrics["tokens"] = sum(jnp.sum(batch[k] > 0, dtype=jnp.float32) for k in sorted(batch) if k.startswith("segment_ids"))
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
