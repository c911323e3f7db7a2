"""The package's layers: every import points down (or within its layer), and none form a cycle.

docs/ARCHITECTURE.md describes the layers; this test is their definition.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rcnas_jax"

# Bottom to top. A module is named by its path under rcnas_jax ('rl.env'); a layer lists module
# prefixes ('rl' = every module of rcnas_jax/rl/).
LAYERS = (
    ("runtime", "reference"),  # Devices, files, checkpoints: nothing about networks.
    ("data",),  # Datasets and batches.
    ("nets",),  # Architectures, the action space, Flax models, inheritance, exports.
    ("robust",),  # Attacks, adversarial training, evaluation.
    ("rl",),  # Tasks, the policy, the environment, the proxy, the search.
    ("config", "report"),  # What a run is, and what it reports.
    ("pipeline",),  # The jobs.
    ("main",),  # The command line.
)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
  for rank, prefixes in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return rank
  raise AssertionError(f"rcnas_jax.{module} is in no layer of tests/test_layers.py")


def _imports(path: pathlib.Path) -> set[str]:
  """The rcnas_jax modules that the file at `path` imports (relative to the package)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module == "rcnas_jax" or node.module.startswith("rcnas_jax.")):
      base = node.module.removeprefix("rcnas_jax").lstrip(".")
      for alias in node.names:
        candidate = f"{base}.{alias.name}" if base else alias.name
        is_module = (PACKAGE / (candidate.replace(".", "/") + ".py")).exists() or (
            PACKAGE / candidate.replace(".", "/")).is_dir()
        found.add(candidate if is_module else base)
    elif isinstance(node, ast.Import):
      found |= {a.name.removeprefix("rcnas_jax.") for a in node.names
                if a.name.startswith("rcnas_jax.")}
  return found - {""}


GRAPH = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))
         if p.name != "__init__.py"}


def test_the_graph_was_read():
  assert GRAPH["rl.env"] >= {"rl.proxy", "rl.tasks", "nets.space", "runtime.store"}
  assert "robust.attacks" in GRAPH["config"] and len(GRAPH) >= 25


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_or_within_the_layer(module):
  upward = {m for m in GRAPH[module] if _layer(m) > _layer(module)}
  assert not upward, f"rcnas_jax.{module} imports a higher layer: {sorted(upward)}"


def test_no_import_cycles():
  state = {}

  def visit(module, stack):
    state[module] = "open"
    for child in sorted(GRAPH.get(module, ())):
      if state.get(child) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack + [module, child]))
      if child not in state:
        visit(child, stack + [module])
    state[module] = "done"

  for module in sorted(GRAPH):
    if module not in state:
      visit(module, [])
