"""The import floors (configs -> trainer -> parallel -> layers -> kernels), no import cycles, the
two registries (attention backends, sequence strategies) as the only places their names resolve,
and a repository that speaks of itself alone. See docs/architecture.md."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("configs", "trainer", "parallel", "layers", "kernels")
FLOOR = {name: i for i, name in enumerate(PACKAGES)}  # a package may import only packages after it
# The leaves every floor may use: pure jax.numpy references and online-softmax math.
LEAVES = {"kernels.reference"}
# The one module of layers/ that reaches the kernels (by name, on first use).
DISPATCHER = "layers.attention.ops"
# The kernel modules every backend file may import besides jax.
KERNEL_COMMON = {"kernels.common", "kernels.reference"}
# flash_pallas owns the GPU flash `Tiling`, whose forward/backward stages may be the Mosaic GPU
# kernels: the one arrow between two backend files (no circle: flash_mgpu imports only common).
KERNEL_EXCEPTIONS = {("kernels.flash_pallas", "kernels.flash_mgpu")}


def _modules():
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      rel = path.relative_to(ROOT).with_suffix("")
      parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
      yield ".".join(parts), path


MODULES = dict(_modules())


def _imports(path, top_level_only=False):
  """First-party modules `path` imports (at module level, or anywhere)."""
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  found = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for a in node.names:  # `from kernels import common` imports kernels.common, not the package
        found.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module)
  return {m for m in found if m in MODULES}


def test_no_module_imports_a_floor_above_it():
  bad = []
  for module, path in MODULES.items():
    floor = FLOOR[module.split(".")[0]]
    for target in _imports(path):
      if FLOOR[target.split(".")[0]] < floor:
        bad.append(f"{module} -> {target}")
  assert not bad, "imports up the floors: " + ", ".join(bad)


def test_layers_reach_kernels_only_through_the_dispatcher():
  bad = [f"{m} -> {t}" for m, p in MODULES.items() if m.startswith("layers") and m != DISPATCHER
         for t in _imports(p) if t.startswith("kernels") and t not in LEAVES]
  assert not bad, "layers importing kernels outside layers/attention/ops.py: " + ", ".join(bad)
  assert not [t for t in _imports(MODULES[DISPATCHER]) if t.startswith("kernels") and t not in LEAVES], \
      "the dispatcher loads backend kernels on first use, not at import"


def test_kernel_files_import_only_the_common_modules():
  bad = []
  for module, path in MODULES.items():
    if not module.startswith("kernels.") or module in KERNEL_COMMON:
      continue
    for target in _imports(path):
      if target not in KERNEL_COMMON and (module, target) not in KERNEL_EXCEPTIONS:
        bad.append(f"{module} -> {target}")
  assert not bad, ", ".join(bad)
  for leaf in KERNEL_COMMON:
    assert not (_imports(MODULES[leaf]) - {"kernels.reference"}), f"{leaf} must be a leaf"


def test_no_import_cycles():
  graph = {m: _imports(p, top_level_only=True) - {m} for m, p in MODULES.items()}
  for m, p in MODULES.items():  # a package's __init__ is not an edge into its modules
    graph[m] = {t for t in graph[m] if not (t in PACKAGES or MODULES[t].name == "__init__.py")}
  done, path = set(), []

  def visit(m):
    if m in path:
      pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
    if m in done:
      return
    path.append(m)
    for t in sorted(graph[m]):
      visit(t)
    path.pop()
    done.add(m)

  for m in sorted(graph):
    visit(m)


def test_backend_and_strategy_names_resolve_in_one_place():
  """No `impl == "pallas"`-style comparisons of attention backends, and no sequence-strategy
  names compared, outside their registries."""
  from layers.attention import ops
  from parallel import sequence
  backends = "|".join(map(re.escape, ops.BACKENDS))  # not "auto", which other options share
  strategies = "|".join(map(re.escape, sequence.choices()))
  impl = re.compile(rf"impl\w*\(?\)?\s*(==|!=|in)\s*\(?\s*[\"']({backends})[\"']")
  strategy = re.compile(rf"strategy\w*\s*(==|!=|in)\s*\(?\s*[\"']({strategies})[\"']")
  allowed = {"layers/attention/ops.py", "parallel/sequence.py"}
  bad = []
  for module, path in MODULES.items():
    rel = str(path.relative_to(ROOT))
    if rel in allowed:
      continue
    for i, line in enumerate(path.read_text().splitlines(), 1):
      if impl.search(line) or strategy.search(line):
        bad.append(f"{rel}:{i}: {line.strip()}")
  assert not bad, "\n".join(bad)


def test_a_new_attention_backend_is_one_class_and_one_registration():
  import jax.numpy as jnp
  import numpy as np

  from kernels.reference import make_mask, reference_attention
  from layers.attention import ops

  class Doubled(ops.Dense):  # a toy backend: the dense reference, times two
    name = "doubled"

    def attention_lse(self, *args, **kw):
      out, lse = super().attention_lse(*args, **kw)
      return out * 2, lse

  try:
    ops.register(Doubled())
    assert "doubled" in ops.choices()
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(1, 8, 2, 4)), jnp.float32) for _ in range(3))
    seg = jnp.ones((1, 8), jnp.int32)
    got = ops.attention(q, k, v, seg, seg, causal=True, impl="doubled")
    idx = jnp.arange(8)[None]
    np.testing.assert_allclose(got, 2 * reference_attention(q, k, v, make_mask(seg, seg, idx, idx, True)),
                               rtol=1e-6)
  finally:
    ops.BACKENDS.pop("doubled", None)


def test_strategy_resolution_per_mixer():
  from layers import mixers
  from parallel import sequence
  m = mixers.MIXERS
  # The default where it applies; the implicit halo for conv; an override for mamba.
  assert sequence.resolve("ring", "", {"conv": m["conv"], "flash": m["flash"]}) == {"conv": "halo", "flash": "ring"}
  assert sequence.resolve("ring", "mamba=scan", {"mamba": m["mamba"], "attention": m["attention"]}) == {
      "mamba": "scan", "attention": "ring"}
  with pytest.raises(sequence.SequenceParallelError, match=r"not available for mixer 'mamba'; it supports: auto, scan.*mamba=STRATEGY"):
    sequence.resolve("ring", "", {"mamba": m["mamba"]})
  with pytest.raises(sequence.SequenceParallelError, match="which it does not support; it supports: auto, ring"):
    sequence.resolve("auto", "flash=scan", {"flash": m["flash"]})
  with pytest.raises(sequence.SequenceParallelError, match="names mixer 'lmu', which is not in this model"):
    sequence.resolve("auto", "lmu=auto", {"flash": m["flash"]})
  with pytest.raises(sequence.SequenceParallelError, match="write MIXER=STRATEGY pairs"):
    sequence.resolve("auto", "flash", {"flash": m["flash"]})


def test_the_repository_speaks_of_itself_alone():
  """No file points to design notes or paper digests kept outside the repository."""
  pattern = re.compile(r"PAPERS\.md|DESIGN\.md|\.\./shared")
  bad = []
  for path in ROOT.rglob("*"):
    rel = path.relative_to(ROOT)
    skipped = rel.parts[0] in (".git", ".venv", "runs") or not path.is_file()
    if skipped or path.suffix not in (".py", ".md", ".sh", ".toml"):
      continue
    if path.name == "test_architecture.py":
      continue
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
      if pattern.search(line):
        bad.append(f"{rel}:{i}")
  assert not bad, "pointers outside the repository: " + ", ".join(bad)


def test_a_new_sequence_strategy_is_one_class_and_one_registration():
  from layers import mixers
  from layers.mixer_base import HALO
  from parallel import sequence
  from parallel.strategy import Strategy

  class Neighbours(Strategy):  # a toy: the halo exchange under another name
    name, needs = "neighbours", HALO

  try:
    sequence.register(Neighbours)
    assert "neighbours" in sequence.choices() and "neighbours" in sequence.supported(mixers.MIXERS["conv"])
    assert sequence.resolve("ring", "conv=neighbours", {"conv": mixers.MIXERS["conv"]}) == {"conv": "neighbours"}
    with pytest.raises(sequence.SequenceParallelError, match="which it does not support"):
      sequence.resolve("auto", "flash=neighbours", {"flash": mixers.MIXERS["flash"]})
  finally:
    sequence.STRATEGIES.pop("neighbours", None)
