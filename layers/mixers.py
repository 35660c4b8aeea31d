"""The mixer registry and the interface every token mixer implements.

A mixer maps `x_btd -> y_btd` given a `MixContext`. The interface covers the whole
family documented in docs/papers.md:

* attention that needs positions (RoPE) or segment ids (packing, padding) reads them
  from the context;
* recurrent mixers and attention with a KV cache keep their decode state in
  `nnx.Cache` variables created by `init_cache(batch, max_len, dtype)`; a call with
  `ctx.decode=True` consumes and advances that state (prefill then one token at a time);
* mixers with auxiliary losses call `add_aux_loss(self, value)`: the trainer adds every
  such value to the training loss;
* mixers with running statistics (e.g. BatchNorm) keep them in `nnx.BatchStat`
  variables, which the train state carries and checkpoints beside the params;
* a mixer whose computation depends on its layer (`spec.layer_index`,
  `spec.alternation_index`) sets `LAYER_INDEXED = True`, so `model.scan_blocks` never runs
  its layers through one shared module (tests/test_remat.py checks every other mixer
  scanned against unrolled).

Adding a mixer: one new module defining a class with this constructor signature, plus
one line in `MIXERS` below.
"""

from __future__ import annotations

from flax import nnx

from layers.mixer_base import MixContext, Mixer, MixerSpec

__all__ = ["MIXERS", "MixContext", "Mixer", "MixerSpec", "make_mixer"]


from layers.attention.block_sparse import BlockSparseAttention, XAttention  # noqa: E402
from layers.attention.combiner import Combiner  # noqa: E402
from layers.attention.exact import Attention, FlashAttention  # noqa: E402
from layers.attention.local import BigBirdAttention, LocalAttention  # noqa: E402
from layers.attention.patterns import Longformer, SparseTransformer  # noqa: E402
from layers.attention.swin import Swin  # noqa: E402
from layers.linear.ecoformer import EcoFormer  # noqa: E402
from layers.linear.linear import LinearTransformer  # noqa: E402
from layers.linear.performer import Performer  # noqa: E402
from layers.linear.sla import SLA  # noqa: E402
from layers.linear.transnormer import TransNormer  # noqa: E402
from layers.lra.linformer import Linformer  # noqa: E402
from layers.lra.reformer import Reformer  # noqa: E402
from layers.lra.sinkhorn import Sinkhorn  # noqa: E402
from layers.lra.synthesizer import Synthesizer  # noqa: E402
from layers.ssm.conv import ShortConv  # noqa: E402
from layers.ssm.lmu import LMU  # noqa: E402
from layers.ssm.mamba import Mamba  # noqa: E402
from layers.ssm.mamba2 import Mamba2  # noqa: E402

MIXERS: dict[str, type[Mixer]] = {
    "attention": Attention,
    "flash": FlashAttention,
    "local": LocalAttention,
    "bigbird": BigBirdAttention,
    "block_sparse": BlockSparseAttention,
    "xattention": XAttention,
    "sparse_transformer": SparseTransformer,
    "longformer": Longformer,
    "combiner": Combiner,
    "swin": Swin,
    "linear": LinearTransformer,
    "performer": Performer,
    "ecoformer": EcoFormer,
    "transnormer": TransNormer,
    "sla": SLA,
    "linformer": Linformer,
    "reformer": Reformer,
    "sinkhorn": Sinkhorn,
    "synthesizer": Synthesizer,
    "mamba": Mamba,
    "mamba2": Mamba2,
    "lmu": LMU,
    "conv": ShortConv,
}


def make_mixer(name: str, spec: MixerSpec, *, rngs: nnx.Rngs) -> Mixer:
  if name not in MIXERS:
    raise KeyError(f"model.mixer={name!r} is not a known mixer; valid mixers: {', '.join(sorted(MIXERS))}")
  return MIXERS[name](spec, rngs=rngs)
