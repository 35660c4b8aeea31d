"""Sequence (context) parallelism: the registry of strategies and the choice of one per mixer.

Activations arrive sharded along the length over the `sequence` mesh axis. Each strategy is
one file and one registration below:

| strategy     | needs from a mixer | file |
|--------------|--------------------|------|
| `auto`       | nothing: the compiler propagates the shardings | - |
| `ring`       | an attention core  | parallel/ring.py |
| `all_gather` | an attention core  | parallel/all_gather.py |
| `all_to_all` | per-head computation on whole rows | parallel/all_to_all.py |
| `scan`       | an associative chunk summary | parallel/scan.py |
| `halo`       | only neighbouring tokens | parallel/halo.py |

The choice is per mixer: `parallel.sequence_strategy` is the default and
`parallel.sequence_overrides` ("MIXER=STRATEGY,...") sets it for named mixers of the schedule.
A mixer the default does not apply to takes the one `implicit` strategy it supports (`halo`
for a convolution), else the run is refused with the strategies it does support.
"""

from __future__ import annotations

import numpy as np
from jax.sharding import Mesh

from parallel.all_gather import AllGather
from parallel.all_to_all import AllToAll
from parallel.halo import Halo
from parallel.ring import Ring
from parallel.scan import Scan
from parallel.strategy import SequenceParallelError, Strategy

AUTO = "auto"
STRATEGIES: dict[str, type[Strategy]] = {}


def register(strategy: type[Strategy]) -> type[Strategy]:
  """Makes `strategy` selectable by its name."""
  if not strategy.name or strategy.name == AUTO or not strategy.needs:
    raise ValueError(f"a sequence strategy needs a name other than {AUTO!r} and the capability it needs")
  STRATEGIES[strategy.name] = strategy
  return strategy


for _strategy in (Ring, AllGather, AllToAll, Scan, Halo):
  register(_strategy)


def choices() -> tuple[str, ...]:
  return (AUTO, *STRATEGIES)


def supported(mixer_cls) -> tuple[str, ...]:
  """The strategies that apply to a mixer class (by its `SEQUENCE_CAPABILITIES`)."""
  caps = getattr(mixer_cls, "SEQUENCE_CAPABILITIES", frozenset())
  return (AUTO, *(name for name, s in STRATEGIES.items() if s.needs in caps))


def parse_overrides(text: str) -> dict[str, str]:
  """"conv=halo, mamba=scan" -> {"conv": "halo", "mamba": "scan"}."""
  out = {}
  for item in filter(None, (part.strip() for part in (text or "").split(","))):
    name, sep, strategy = (s.strip() for s in item.partition("="))
    if not sep or not name or not strategy:
      raise SequenceParallelError(f"parallel.sequence_overrides={text!r} is not valid; write MIXER=STRATEGY pairs "
                                  f"separated by commas, e.g. 'conv=halo,mamba=scan'")
    if strategy not in choices():
      raise SequenceParallelError(f"parallel.sequence_overrides gives mixer {name!r} strategy {strategy!r}, which is "
                                  f"not one of {', '.join(choices())}")
    if name in out:
      raise SequenceParallelError(f"parallel.sequence_overrides={text!r} names mixer {name!r} twice")
    out[name] = strategy
  return out


def strategy_for(name: str, mixer_cls, default: str, overrides: dict[str, str]) -> str:
  """The strategy mixer `name` (registry name; class `mixer_cls`) runs under, or a one-sentence
  SequenceParallelError."""
  if default not in choices():
    raise SequenceParallelError(f"parallel.sequence_strategy={default!r} is not one of {', '.join(choices())}")
  ok = supported(mixer_cls)
  if name in overrides:
    if overrides[name] not in ok:
      raise SequenceParallelError(f"parallel.sequence_overrides gives mixer {name!r} strategy {overrides[name]!r}, "
                                  f"which it does not support; it supports: {', '.join(ok)}")
    return overrides[name]
  if default in ok:
    return default
  implicit = [s for s in ok[1:] if STRATEGIES[s].implicit]
  if len(implicit) == 1:
    return implicit[0]
  raise SequenceParallelError(f"parallel.sequence_strategy={default!r} is not available for mixer {name!r}; it "
                              f"supports: {', '.join(ok)} (choose one for it with "
                              f"parallel.sequence_overrides='{name}=STRATEGY')")


def resolve(default: str, overrides_text: str, mixers: dict[str, type]) -> dict[str, str]:
  """{mixer name: strategy} for the mixers of a schedule; refuses overrides naming other mixers."""
  overrides = parse_overrides(overrides_text)
  unknown = sorted(set(overrides) - set(mixers))
  if unknown:
    raise SequenceParallelError(f"parallel.sequence_overrides names mixer {unknown[0]!r}, which is not in this "
                                f"model's schedule ({', '.join(sorted(mixers))})")
  return {name: strategy_for(name, cls, default, overrides) for name, cls in mixers.items()}


class SequenceParallel:
  """The strategies in force while a model is traced (installed by
  `layers.mixer_base.use_sequence_parallel`): a default and per-mixer overrides, each strategy
  bound to the mesh once."""

  def __init__(self, mesh: Mesh, rules, default: str, overrides: str | dict = ""):
    if default not in choices():
      raise SequenceParallelError(f"parallel.sequence_strategy={default!r} is not one of {', '.join(choices())}")
    self.mesh, self.rules, self.default = mesh, rules, default
    self.overrides = parse_overrides(overrides) if isinstance(overrides, str) else dict(overrides)
    self._bound: dict[str, Strategy] = {}

  def bound(self, name: str) -> Strategy | None:
    """The named strategy bound to this mesh (None for `auto`)."""
    if name == AUTO:
      return None
    if name not in self._bound:
      self._bound[name] = STRATEGIES[name](self.mesh, self.rules)
    return self._bound[name]

  def for_mixer(self, mixer) -> Strategy | None:
    """The strategy `mixer` runs under (None: the compiler's own sharding)."""
    return self.bound(strategy_for(mixer.spec.name, type(mixer), self.default, self.overrides))

  _OPERATIONS = ("attention", "heads", "linear_attention", "selective_scan", "halo")

  def __getattr__(self, name):
    """The default strategy's operations (`sp.attention(...)`, `sp.linear_attention(...)`), for
    callers holding a bare function rather than a mixer."""
    if name in SequenceParallel._OPERATIONS:
      if self.default == AUTO:
        raise SequenceParallelError(f"parallel.sequence_strategy='auto' has no explicit {name} path")
      return getattr(self.bound(self.default), name)
    raise AttributeError(name)


def zigzag_permutation(length: int, n: int):
  """Storage order for causal load balance: device i holds chunks i and 2n-1-i of 2n.

  Returns `perm` with stored[j] = original[perm[j]] (so `perm` is also the true position
  of each stored token, the `index` attention masks by).
  """
  if length % (2 * n):
    raise SequenceParallelError(f"load-balanced (zigzag) sequence parallelism needs task.seq_len={length} "
                                f"divisible by 2 x mesh.sequence = {2 * n}")
  c = length // (2 * n)
  chunks = np.arange(length).reshape(2 * n, c)
  order = [j for i in range(n) for j in (i, 2 * n - 1 - i)]
  return chunks[order].reshape(-1)
