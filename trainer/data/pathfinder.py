"""Pathfinder / Path-X (Long Range Arena): are the two markers on the same curve?

Each example is a square greyscale image of `resolution` x `resolution` pixels (32 is
LRA's Pathfinder, 128 its Path-X with 16384 tokens) read row-major as pixel tokens, with
a binary label. The image holds curves ("snakes"), each a chain of straight paddles of
`paddle_length` pixels joined end to end, the direction turning between consecutive
paddles by a uniform angle in [-max_turn, max_turn]. Two disk markers of radius
`marker_radius` sit on snake ends. Every image has two snakes of `contour_length`
paddles: label 1 puts both markers on the two ends of one of them, label 0 one marker
on an end of each; `num_distractors` snakes of `distractor_length` paddles are added.
The label is a fair coin drawn before the image.

Guarantees, which make the label exactly the 8-connectivity of the markers:

* no pixel of one snake (markers included) is an 8-neighbour of a pixel of another;
* each chain is a simple 8-path whose pixels touch only their predecessor and
  successor (paddles are digital straight lines), so a snake never touches itself;
* a marker lies wholly inside the image, and its snake, once it leaves the marker's
  neighbourhood, never comes back to it; the two markers never touch.

How: an occupancy grid holds the 3x3-dilated pixels of the snakes drawn so far, so a
candidate paddle is tested with one lookup per pixel. A snake grows from a free seed
pixel at both ends (each paddle at a random end, the other when one is stuck); a paddle
that leaves the image or hits the grid gets a new angle (PADDLE_TRIES), then the last
paddle is taken back (MAX_BACKTRACKS), then the snake restarts from a new seed
(SNAKE_TRIES), then the image is redrawn under the next attempt salt. Settings that
cannot be drawn raise DataError, from a quick area bound or from a probe of a few
images at construction.

Settings (defaults by resolution; see `default_settings`):

  =========  ==============  =============  ========  ===============  =============
  res        contour_length  paddle_length  max_turn  num_distractors  marker_radius
  =========  ==============  =============  ========  ===============  =============
  32         14              3              1.0       5                1
  64         14              5              0.9       6                2
  128        14              8              0.8       8                3
  =========  ==============  =============  ========  ===============  =============

distractor_length defaults to contour_length // 3 = 4 paddles, as in the original.

Relation to the original generator (Linsley et al. 2018, "snakes2", used for LRA with
contour length 14, its hardest setting): kept are paddle chains with bounded turning,
two target snakes of equal length in both classes (so the amount of curve does not
give the label away), distractors a third as long (LRA used 20 // 4 = 5 of them at 32;
Path-X recipes use 35 / 4.67, about 7.5, at 128), disk markers on snake ends, and 50/50
labels. Differences: the original draws anti-aliased paddles ~1.5 px thick with a gap
(paddle_margin) after each, so its curves are dashed (at 32: 2 px paddles, 1 px gaps;
our solid 3 px paddles cover about the same length per paddle); it turns by a
cos^2-weighted angle set by `continuity` (1.0 at 32, 1.8 at 128) rather than a uniform
one; and it keeps snakes apart by a margin on its super-sampled canvas, which does not
rule out touching pixels in the final image. Here curves are solid one-pixel lines,
rendering is binary (background 0, snake 200, marker 255), and no contact is
guaranteed, so connectivity, and so the label, is exact. Tokens are intensity + 1
(ids 1, 201 and 256 of a 257-id vocabulary; 0 stays padding).

Splits: example `index` of a split is drawn from `split_rng(seed, split, index,
salt=attempt)` for attempt 0, 1, ... until the image's bytes hash into the split's
buckets, so the splits share no image; the label is attempt 0's first draw, so
redrawing cannot skew it.

Speed (CPU time per example on one core of a shared 2-core AMD EPYC VM, best of 5 runs
of 100-300 examples): train 1.4 ms at 32x32, 1.5 ms at 64x64, 1.8 ms at 128x128; the
drawing is pure Python over a bytearray grid, so its cost follows the snake pixels, not
the image area. Validation and test own one hash bucket in ten, so they draw ~10 images
per example: 11, 9 and 15 ms.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from trainer.data.base import SPLIT_BUCKETS, DataError, Task, TaskSpec, hash_bucket, split_rng

BACKGROUND, SNAKE, MARKER = 0, 200, 255
ONES = b"\x01\x01\x01"  # one row of a pixel's 3x3 neighbourhood in an occupancy grid
VOCAB_SIZE = 257  # token = intensity + 1, so id 0 stays padding and is never produced
ASCII = {BACKGROUND: ".", SNAKE: "#", MARKER: "o"}

# Bounded retries at every level (see the module docstring): turning angles per paddle,
# restarts per snake, uniform draws to find a free start pixel.
PADDLE_TRIES = 8
SNAKE_TRIES = 30
MAX_BACKTRACKS = 10
SEED_TRIES = 20
# Whole-image attempts per example. Validation and test own one hash bucket in ten, so
# they need ~10 attempts on average; reaching MAX_ATTEMPTS means something is broken.
MAX_ATTEMPTS = 2000
# Images that could not be drawn (a snake failed SNAKE_TRIES times) before an example
# gives up with a DataError, and images the construction-time probe tries.
MAX_DRAW_FAILURES = 200
PROBE_ATTEMPTS = 20


def default_settings(resolution: int) -> dict[str, Any]:
  """Defaults per resolution, given by formulas that hit round values at 32, 64 and 128.

  32: paddles of 3 px turning up to 1.0 rad, markers of radius 1, 5 distractors;
  64: 5 px, 0.9 rad, radius 2, 6 distractors; 128: 8 px, 0.8 rad, radius 3, 8 distractors.
  Contour length 14 (LRA's hardest) everywhere, distractors a third as long.
  """
  scale = resolution / 32
  return {
      "contour_length": 14,
      "paddle_length": max(2, round(3 * scale ** 0.7)),
      "max_turn": round(min(1.2, max(0.5, 1.0 - 0.1 * math.log2(scale))), 2),
      "num_distractors": max(0, round(5 * scale ** 0.35)),
      "distractor_length": None,  # contour_length // 3
      "marker_radius": max(0, round(math.log2(max(resolution, 16) / 16))),
  }


def _uniforms(rng: np.random.Generator) -> Iterator[float]:
  # Blocks of Python floats: ~10x cheaper than one numpy call per draw.
  while True:
    yield from rng.random(256).tolist()


def image_of(example: dict[str, np.ndarray]) -> np.ndarray:
  """The example's picture as a [r, r] uint8 array of intensities."""
  inputs = np.asarray(example["inputs"]).reshape(-1)
  r = math.isqrt(inputs.size)
  if r * r != inputs.size:
    raise DataError(f"pathfinder inputs of length {inputs.size} are not a square image")
  return (inputs - 1).clip(0, 255).astype(np.uint8).reshape(r, r)


def markers_connected(image: np.ndarray) -> bool:
  """Whether all marker pixels lie in one 8-connected component of non-background pixels."""
  fg = np.pad(image != BACKGROUND, 1)
  marks = np.pad(image == MARKER, 1)
  if not marks.any():
    return False
  reach = np.zeros_like(fg)
  first = np.argwhere(marks)[0]
  reach[tuple(first)] = True
  while True:
    grown = reach.copy()
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        grown[1:-1, 1:-1] |= reach[1 + dy:reach.shape[0] - 1 + dy, 1 + dx:reach.shape[1] - 1 + dx]
    grown &= fg
    if (grown == reach).all():
      return bool(reach[marks].all())
    reach = grown


def render_png(example: dict[str, np.ndarray], path: str, scale: int = 4) -> None:
  """Writes the example's picture, upscaled `scale` times by nearest neighbour, as a PNG."""
  from PIL import Image  # pillow is needed only to look at examples

  image = image_of(example)
  scale = int(scale)
  if scale < 1:
    raise DataError(f"render_png scale={scale} must be at least 1")
  Image.fromarray(np.kron(image, np.ones((scale, scale), np.uint8))).save(path, format="PNG")


class Pathfinder(Task):
  """Pathfinder (32x32) / Path-X (128x128) as binary classification over pixel tokens."""

  def __init__(self, seq_len: int, seed: int, resolution: int = 32, contour_length: int | None = None,
               paddle_length: int | None = None, max_turn: float | None = None,
               num_distractors: int | None = None, distractor_length: int | None = None,
               marker_radius: int | None = None):
    seq_len, seed, resolution = int(seq_len), int(seed), int(resolution)
    if resolution < 4:
      raise DataError(f"pathfinder resolution={resolution} must be at least 4 pixels")
    if seq_len != resolution * resolution:
      raise DataError(f"task.seq_len={seq_len} does not match pathfinder resolution={resolution}, whose "
                      f"image has resolution**2 = {resolution * resolution} pixel tokens; set seq_len to "
                      "resolution**2 (1024 for 32, 4096 for 64, 16384 for 128)")
    given = {"contour_length": contour_length, "paddle_length": paddle_length, "max_turn": max_turn,
             "num_distractors": num_distractors, "distractor_length": distractor_length,
             "marker_radius": marker_radius}
    settings = default_settings(resolution)
    # None or a negative value (the config's -1) takes the resolution's default.
    settings.update({k: v for k, v in given.items() if v is not None and v >= 0})
    self.seed, self.resolution = seed, resolution
    self.contour_length = int(settings["contour_length"])
    self.paddle_length = int(settings["paddle_length"])
    self.max_turn = float(settings["max_turn"])
    self.num_distractors = int(settings["num_distractors"])
    self.distractor_length = (max(1, self.contour_length // 3) if settings["distractor_length"] is None
                              else int(settings["distractor_length"]))
    self.marker_radius = int(settings["marker_radius"])
    self._check_settings()
    self._width = resolution + 2  # the occupancy grids carry a one-pixel frame
    w, rad = self._width, self.marker_radius
    self._offsets = tuple(dy * w + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    self._disk = tuple((dy, dx) for dy in range(-rad, rad + 1) for dx in range(-rad, rad + 1)
                       if dy * dy + dx * dx <= (rad + 0.5) ** 2)
    self.spec = TaskSpec(kind="classify", vocab_size=VOCAB_SIZE, seq_len=seq_len, num_classes=2, chance=0.5,
                         chance_note="0.5: each example's label is a fair coin flip drawn before its image",
                         grid=(resolution, resolution))
    self._probe()

  # -- settings ---------------------------------------------------------------------------

  def _cannot_draw(self) -> str:
    r = self.resolution
    return (f"pathfinder cannot fit 2 snakes of contour_length={self.contour_length} and "
            f"num_distractors={self.num_distractors} distractors of distractor_length={self.distractor_length} "
            f"paddles without contact into a {r}x{r} image (paddle_length={self.paddle_length}, "
            f"marker_radius={self.marker_radius}, max_turn={self.max_turn:.3g}); use fewer or shorter snakes "
            "or a larger resolution")

  def _check_settings(self) -> None:
    r = self.resolution
    if self.contour_length < 1:
      raise DataError(f"pathfinder contour_length={self.contour_length} must be at least 1 paddle")
    if self.distractor_length < 1:
      raise DataError(f"pathfinder distractor_length={self.distractor_length} must be at least 1 paddle")
    if not 2 <= self.paddle_length < r:
      raise DataError(f"pathfinder paddle_length={self.paddle_length} must be between 2 and "
                      f"resolution - 1 = {r - 1} pixels")
    if not (math.isfinite(self.max_turn) and 0 <= self.max_turn <= math.pi / 2):
      raise DataError(f"pathfinder max_turn={self.max_turn} must be between 0 and pi/2 radians")
    if self.num_distractors < 0:
      raise DataError(f"pathfinder num_distractors={self.num_distractors} must be at least 0")
    if not 0 <= 2 * self.marker_radius + 1 <= r // 2:
      raise DataError(f"pathfinder marker_radius={self.marker_radius} must be between 0 and "
                      f"{max(0, (r // 2 - 1) // 2)} at resolution={r}")
    # A quick necessary condition (the construction-time probe catches the rest): pixels of
    # a 2x2 block all touch, so it holds at most two chain pixels (consecutive ones of one
    # snake), and a paddle of length L spans at least floor(L / sqrt(2) - 1) + 1 pixels.
    per_paddle = math.floor(self.paddle_length / math.sqrt(2) - 1) + 1
    disk = sum(1 for dy in range(-self.marker_radius, self.marker_radius + 1)
               for dx in range(-self.marker_radius, self.marker_radius + 1)
               if dy * dy + dx * dx <= (self.marker_radius + 0.5) ** 2)
    need = (2 * (1 + self.contour_length * per_paddle) - 2 * disk
            + self.num_distractors * (1 + self.distractor_length * per_paddle))
    if need > 2 * ((r + 1) // 2) ** 2:
      raise DataError(self._cannot_draw())

  def _probe(self) -> None:
    """Draws a few images from a stream of its own; settings that never succeed fail here."""
    rng = np.random.default_rng([self.seed, 0x9A7F1D, 0x9120BE])
    for _ in range(PROBE_ATTEMPTS):
      draw = _uniforms(rng).__next__
      if self._draw_image(draw, int(draw() < 0.5)) is not None:
        return
    raise DataError(self._cannot_draw())

  # -- drawing ----------------------------------------------------------------------------

  def _grow(self, draw, base: bytearray, paddles: int, start_marker: bool, end_marker: bool):
    """One snake that keeps clear of `base` (the dilated occupancy of earlier snakes).

    The snake grows from a free seed pixel at both ends: each paddle goes to a random end
    (the other end when that one is stuck), turning by a uniform angle in
    [-max_turn, max_turn] from that end's heading; both ends start straight out of the
    seed. A paddle that would leave the image or come near another snake, or near its own
    chain other than at the end it grows from, is redrawn up to PADDLE_TRIES times; if no
    angle fits at either end, the last paddle is taken back (at most MAX_BACKTRACKS
    times), and after that the snake restarts from a new seed (SNAKE_TRIES in all).

    Returns (chain, markers): padded flat pixel indices of the chain, in order from one
    end to the other, and of the marker disks; or None. On success `base` is updated.
    """
    r, w, step = self.resolution, self._width, float(self.paddle_length)
    max_turn = self.max_turn
    sin, cos, tau, pi = math.sin, math.cos, 2 * math.pi, math.pi
    for _ in range(SNAKE_TRIES):
      for _ in range(SEED_TRIES):
        y, x = draw() * r, draw() * r
        seed = (int(y) + 1) * w + int(x) + 1
        if not base[seed]:
          break
      else:
        continue
      work = bytearray(base)
      heading = draw() * tau
      # Per end: [y, x, heading, last pixel]; an end's last pixel is the one pixel of
      # the chain not yet dilated into `work` (the seed stays undilated until both ends
      # have left it). `grown[s]` lists end s's pixels from the seed outwards.
      ends = [[y, x, heading, seed], [y, x, heading + pi, seed]]
      grown: list[list[int]] = [[], []]
      saved = []  # (work, end, its state, its length) before each placed paddle
      backtracks = 0
      # An end that found no angle stays stuck (the other end's growth only adds
      # obstacles) until a paddle is taken back.
      stuck = [False, False]
      while len(saved) < paddles:
        first = 0 if draw() < 0.5 else 1
        for s in (first, 1 - first):
          if stuck[s]:
            continue
          ey, ex, eh, end = ends[s]
          other = ends[1 - s][3]
          orow, ocol = divmod(other, w)  # in the framed grid, one more than image rows/cols
          row, col = int(ey), int(ex)
          for _ in range(PADDLE_TRIES):
            h = eh + (2 * draw() - 1) * max_turn
            ny, nx = ey + step * sin(h), ex + step * cos(h)
            if not (0 <= ny < r and 0 <= nx < r):
              continue
            dr, dc = int(ny) - row, int(nx) - col
            n = max(abs(dr), abs(dc))
            if n == 0:
              continue
            # A digital straight line (DDA, round half up): one pixel per step of its
            # major axis, so pixels of one paddle touch only their neighbours.
            n2 = 2 * n
            pix = [end + ((2 * i * dr + n) // n2) * w + (2 * i * dc + n) // n2 for i in range(1, n + 1)]
            for p in pix:
              if work[p]:
                break
            else:
              # The other end's pixel is not in `work` either; keep clear of it too.
              erow, ecol = row + dr, col + dc
              if (other == end or not min(row, erow) <= orow <= max(row, erow) + 2
                  or not min(col, ecol) <= ocol <= max(col, ecol) + 2):
                break
              for p in pix:
                prow, pcol = divmod(p, w)
                if abs(prow - orow) <= 1 and abs(pcol - ocol) <= 1:
                  break
              else:
                break
          else:
            stuck[s] = True
            continue  # try the other end
          break
        else:
          # Neither end can grow: take back the last paddle, or restart the snake.
          if not saved or backtracks == MAX_BACKTRACKS:
            break
          backtracks += 1
          snapshot, s, state, length = saved.pop()
          work = bytearray(snapshot)
          ends[s] = state
          del grown[s][length:]
          stuck = [False, False]
          continue
        saved.append((bytes(work), s, ends[s], len(grown[s])))
        for p in (pix[:-1] if end == other else [end] + pix[:-1]):
          work[p - w - 1:p - w + 2] = work[p - 1:p + 2] = work[p + w - 1:p + w + 2] = ONES
        grown[s].extend(pix)
        ends[s] = [ny, nx, h, pix[-1]]
      else:
        chain = grown[1][::-1] + [seed] + grown[0]
        markers = self._markers(base, chain, start_marker, end_marker)
        if markers is None:
          continue
        for p in chain + markers:
          base[p - w - 1:p - w + 2] = base[p - 1:p + 2] = base[p + w - 1:p + w + 2] = ONES
        return chain, markers
    return None

  def _markers(self, base: bytearray, chain: list[int], start: bool, end: bool) -> list[int] | None:
    """Marker disks at the requested ends, or None if one would leave the image or touch
    another snake, or if the chain comes back near its own marker after leaving it."""
    w, r, offsets = self._width, self.resolution, self._offsets
    disks = []
    for want, centre, order in ((start, chain[0], chain), (end, chain[-1], chain[::-1])):
      if not want:
        continue
      row, col = divmod(centre, w)
      disk = []
      for dy, dx in self._disk:
        if not (1 <= row + dy <= r and 1 <= col + dx <= r):
          return None
        p = centre + dy * w + dx
        if base[p]:
          return None
        disk.append(p)
      near = {p + o for p in disk for o in offsets}
      # The chain pixels near the disk must be a run from this end: once it leaves, it
      # never returns.
      flags = [p in near for p in order]
      first_out = flags.index(False) if False in flags else len(flags)
      if any(flags[first_out:]):
        return None
      disks.append((disk, near))
    if len(disks) == 2 and not disks[1][1].isdisjoint(disks[0][0]):
      return None
    return [p for disk, _ in disks for p in disk]

  def _draw_image(self, draw, label: int) -> np.ndarray | None:
    """The [r, r] uint8 image for `label`, or None if some snake could not be placed.

    Both labels draw two snakes of `contour_length` paddles (as the original does, so the
    amount of curve does not give the label away): label 1 puts both markers on the ends of
    one of them, first or second drawn at random (in label 0 one marker is on each, so
    either way a marker's snake is the first drawn half the time), label 0 one marker on a
    random end of each. Distractors follow.
    """
    w = self._width
    base = bytearray(w * w)
    if label:
      plan = [(self.contour_length, True, True), (self.contour_length, False, False)]
      if draw() < 0.5:
        plan.reverse()
    else:
      a_start, b_start = draw() < 0.5, draw() < 0.5
      plan = [(self.contour_length, a_start, not a_start), (self.contour_length, b_start, not b_start)]
    plan += [(self.distractor_length, False, False)] * self.num_distractors
    canvas = np.zeros(w * w, np.uint8)
    chains, marks = [], []
    for paddles, start, end in plan:
      drawn = self._grow(draw, base, paddles, start, end)
      if drawn is None:
        return None
      chains.extend(drawn[0])
      marks.extend(drawn[1])
    canvas[chains] = SNAKE
    canvas[marks] = MARKER
    return canvas.reshape(w, w)[1:-1, 1:-1].copy()

  # -- the Task interface ----------------------------------------------------------------

  def image(self, split: str, index: int) -> tuple[np.ndarray, int]:
    """The [r, r] uint8 picture and label of example `index` of `split`."""
    label = None
    failures = 0
    for attempt in range(MAX_ATTEMPTS):
      draw = _uniforms(split_rng(self.seed, split, index, salt=attempt)).__next__
      coin = int(draw() < 0.5)
      if label is None:
        label = coin  # the label is attempt 0's first draw, so redraws cannot skew it
      image = self._draw_image(draw, label)
      if image is None:
        failures += 1
        if failures >= MAX_DRAW_FAILURES:
          raise DataError(self._cannot_draw())
        continue
      if hash_bucket(image.tobytes()) in SPLIT_BUCKETS[split]:
        return image, label
    raise DataError(f"pathfinder could not draw example {index} of split {split!r} in {MAX_ATTEMPTS} attempts")

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    image, label = self.image(split, index)
    t = self.spec.seq_len
    return {"inputs": image.reshape(-1).astype(np.int32) + 1, "segment_ids": np.ones(t, np.int32),
            "positions": np.arange(t, dtype=np.int32), "label": np.asarray(label, np.int32)}

  def decode(self, example: dict[str, np.ndarray]) -> dict[str, Any]:
    image = image_of(example)
    chars = np.full(image.shape, "?")
    for value, char in ASCII.items():
      chars[image == value] = char
    return {"label": int(example["label"]), "connected": markers_connected(image),
            "resolution": int(image.shape[0]), "ascii": ["".join(row) for row in chars]}
