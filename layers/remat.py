"""Model-level rematerialisation (`model.remat`): what each block keeps for the backward pass.

Without remat, the backward pass of a block reads every intermediate its forward pass
made (norm outputs, projections, attention probabilities or their flash statistics, the
MLP's hidden layer), so a train step holds all of them for all layers at once. A remat
policy wraps each block in `jax.checkpoint`: the forward keeps only what the policy
names as saveable (always the block's input) and the backward recomputes the rest,
block by block. Memory falls from about L blocks of intermediates to L block inputs plus
one block's intermediates; the price is a second forward of the recomputed parts.

Policies (the names are the config values):

- `none`: keep everything (no `jax.checkpoint`).
- `full`: keep only each block's input; the whole block is recomputed in the backward
  (`jax.checkpoint_policies.nothing_saveable`). Lowest memory, about one extra forward.
- `dots`: keep the output of every matrix product, recompute the element-wise rest
  (norms, activations, softmax): `dots_saveable`. Attention's score matrices are products
  too, so this keeps [T, T] per head, for flash attention as well (its blockwise scores
  are products): at long T it holds more than `none`.
- `dots_no_batch`: keep the outputs of the weight products only (projections and the
  MLP: products with no batch dimension), recompute attention's batched products and the
  element-wise rest (`dots_with_no_batch_dims_saveable`). The usual choice for long
  sequences: the weight products are the expensive part to recompute, the scores the
  large part to keep.
- `offload`: as `dots_no_batch`, but the kept products go to pinned host memory and come
  back for the backward (`offload_dot_with_no_batch_dims`). Useful on GPU/TPU when
  device memory, not bandwidth, is short; on CPU host and device memory are the same.

The policy applies to training only; evaluation and decoding take no gradient.

Where it takes effect: the XLA CPU compiler schedules the recomputation of unrolled
checkpointed blocks early and keeps the result, so on CPU a policy lowers memory only with
`model.scan_blocks=true` (the blocks in a loop; measured in BENCHMARKS.md). `--dry_run`
prints the compiled step's temporaries, so the effect of a choice can be read before a run.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

DEFAULT = "none"


def _policies() -> dict[str, Callable | None]:
  p = jax.checkpoint_policies
  return {
      "none": None,
      "full": p.nothing_saveable,
      "dots": p.dots_saveable,
      "dots_no_batch": p.dots_with_no_batch_dims_saveable,
      "offload": p.offload_dot_with_no_batch_dims("device", "pinned_host"),
  }


CHOICES = ("none", "full", "dots", "dots_no_batch", "offload")


def policy(name: str) -> Callable | None:
  """The `jax.checkpoint` policy of `name`; None for "none" (no checkpointing)."""
  policies = _policies()
  if name not in policies:
    raise ValueError(f"model.remat={name!r} is not a remat policy; valid: {', '.join(CHOICES)}")
  return policies[name]
