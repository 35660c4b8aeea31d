"""Halo sequence parallelism: for mixers that read only the k tokens around each token (short
convolutions). Each device computes its own chunk after receiving the `left` tokens before it
from its left neighbour and the `right` tokens after it from its right neighbour
(`Strategy.halo`: two `ppermute`s of [b, k, ...]); exact, and nothing else moves.

It is `implicit`: a mixer that has the `halo` capability takes it whenever the configured
strategy does not apply to it, so a schedule such as `conv,attention` trains under `ring`.
"""

from __future__ import annotations

from layers.mixer_base import HALO
from parallel.strategy import Strategy


class Halo(Strategy):
  name = "halo"
  needs = HALO
  doc = "short convolutions: each device receives the k tokens beside its chunk from its neighbours"
  implicit = True
