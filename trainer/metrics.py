"""metrics.jsonl (one JSON object per event, always with `step`), TensorBoard events
when tensorboardX is installed, and the one-line progress bar. Only process 0 writes."""

from __future__ import annotations

import json
import math
import os
import sys
import time


class MetricsWriter:

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter  # optional: event files for TensorBoard
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        self.tb = None

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v) for k, v in values.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    if self.tb is not None:
      for k, v in clean.items():
        if isinstance(v, float) and math.isfinite(v):
          self.tb.add_scalar(k, v, int(step))
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
  """`[####....] step 120/600 loss 1.83 12.3k tok/s ETA 3:10` on stderr.

  Redraws in place on a terminal; elsewhere (CI, log files) prints a line every ~10%.
  """

  def __init__(self, total: int, start: int, enabled: bool, width: int = 24):
    self.total, self.start, self.enabled, self.width = total, start, enabled, width
    self.tty = sys.stderr.isatty()
    self.t0 = time.time()
    self.last_line_step = start

  def update(self, step: int, loss: float, tokens_per_sec: float) -> None:
    if not self.enabled:
      return
    done = step - self.start
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    frac = step / max(self.total, 1)
    bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
    tps = f"{tokens_per_sec / 1000:.1f}k" if tokens_per_sec >= 1000 else f"{tokens_per_sec:.0f}"
    line = (f"[{bar}] step {step}/{self.total} loss {loss:.4f} {tps} tok/s "
            f"ETA {format_duration(eta) if math.isfinite(eta) else '?'}")
    if self.tty:
      sys.stderr.write("\r" + line + "   ")
      sys.stderr.flush()
    elif step - self.last_line_step >= max(self.total // 10, 1) or step == self.total:
      self.last_line_step = step
      print(line, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.enabled and self.tty:
      sys.stderr.write("\n")
      sys.stderr.flush()
