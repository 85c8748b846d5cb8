"""The import graph of fiat_jax and tasks has no cycle, counting imports inside functions too: a deferred import
may keep `fiat --help` light, never hide a cycle."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('fiat_jax', 'tasks')


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the packages."""
  out = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if name.endswith('.py'):
          path = os.path.join(folder, name)
          dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
          out[dotted.removesuffix('.__init__')] = path
  return out


def _edges(path: str, modules: dict[str, str]) -> set[str]:
  """The modules of ours a file imports, anywhere in it (module level, functions, branches)."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read(), path)):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in modules else node.module
               for alias in node.names]
    else:
      continue
    for name in names:
      parts = name.split('.')
      found.update('.'.join(parts[:i]) for i in range(1, len(parts) + 1) if '.'.join(parts[:i]) in modules)
  return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or v in graph[v]:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_cycle_finder_finds_a_cycle_through_a_deferred_import(tmp_path):
  """The checker itself: a function-level import that closes a circle is caught."""
  pkg = tmp_path / 'fiat_jax'
  pkg.mkdir()
  (pkg / '__init__.py').write_text('')
  (pkg / 'a.py').write_text('from fiat_jax import b\n')
  (pkg / 'b.py').write_text('def f():\n  from fiat_jax import a\n  return a\n')
  (pkg / 'c.py').write_text('import fiat_jax.a\n')
  modules = {'fiat_jax': str(pkg / '__init__.py'), 'fiat_jax.a': str(pkg / 'a.py'), 'fiat_jax.b': str(pkg / 'b.py'),
             'fiat_jax.c': str(pkg / 'c.py')}
  graph = {m: _edges(p, modules) - {m} for m, p in modules.items()}
  assert graph == {'fiat_jax': set(), 'fiat_jax.a': {'fiat_jax', 'fiat_jax.b'},
                   'fiat_jax.b': {'fiat_jax', 'fiat_jax.a'}, 'fiat_jax.c': {'fiat_jax', 'fiat_jax.a'}}
  assert _cycles(graph) == [['fiat_jax.a', 'fiat_jax.b']]


def test_no_import_cycle():
  modules = _modules()
  assert len(modules) > 50 and 'fiat_jax.data.pipeline' in modules and 'tasks.xtreme_up' in modules
  graph = {m: _edges(p, modules) - {m} for m, p in modules.items()}
  assert sum(len(e) for e in graph.values()) > 150  # the walk sees the imports (of ours) it should
  cycles = _cycles(graph)
  assert not cycles, 'import cycles:\n' + '\n'.join(' <-> '.join(c) for c in cycles)
