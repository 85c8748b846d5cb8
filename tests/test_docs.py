"""Every reference in the repository points inside it.

Reads every tracked text file (`git ls-files`; without git, every file under the repository root except build
outputs) and fails, naming each file and line, when one
  - names an internal note that is not part of the repository (NOTES below);
  - names a repository path (`docs/...`, `fiat_jax/...`, `gin_configs/...`, `tasks/...`, `tests/...`,
    `benchmarks/...`, `launch/...`) or a gin file relative to `gin_configs/` (`runs/...gin`, `recipes/...gin`,
    ...) that does not exist;
  - names a Python module (`something.py`, or dotted: `fiat_jax.data.pipeline`) that the repository does not
    have, such as a module's name from before it moved;
  - in Markdown, links to a relative path that does not exist or lies outside the repository, or to a heading
    anchor that the target file does not have.
Paths with placeholders (`<setting>`, `*`, `{lang}`, `$VAR`) are not checked. ALLOWED lists the references that
are deliberately not files of the repository, each with its reason. This file itself is not scanned (it spells
out the allowed exceptions).
"""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELF = os.path.relpath(os.path.abspath(__file__), ROOT).replace(os.sep, '/')

# Internal notes that were never part of the repository: their names must not appear anywhere.
NOTES = ('FIDELITY', 'DATA')
NOTE_RE = re.compile(r'\b(?:' + '|'.join(NOTES) + r')\.md\b')

TOP_DIRS = ('docs', 'fiat_jax', 'gin_configs', 'tasks', 'tests', 'benchmarks', 'launch')
PATH_RE = re.compile(r'(?<![\w/.\-])((?:' + '|'.join(TOP_DIRS) + r')/[\w./\-<>*{}$]*)')
GIN_DIRS = ('runs', 'recipes', 'datasets', 'sizes', 'models', 'beta')
GIN_RE = re.compile(r'(?<![\w/.\-])((?:' + '|'.join(GIN_DIRS) + r')/[\w./\-<>*{}$]*\.gin)\b')
MODULE_RE = re.compile(r'(?<![\w/.\-<>{}$])([A-Za-z_]\w*\.py)\b')
LINK_RE = re.compile(r'\[[^\]\n]*\]\(([^)\s]+)\)')
PLACEHOLDER = re.compile(r'[<>*{}$]')

# (file, reference): references that are deliberately not files of the repository.
ALLOWED = {
    ('tests/e2e/test_first_hour.py', 'runs/xor_attriqa/xs_finetun.gin'): 'the misspelt name the test expects an error for',
    ('tests/test_cli.py', 'tasks/my.gin'): 'a gin file the test writes in a temporary directory',
    ('tests/test_launch.py', 'gin_configs/missing.gin'): 'the missing file the test asks for',
    ('tests/test_checkpoint.py', 'run_train.py'): 'a script the test writes',
    ('tests/test_faults_store.py', 'writer.py'): 'a script the test writes',
    ('README.md', 'my_lora.py'): "the user's own module in the LoRA example",
    ('tests/test_user_lora.py', 'clashing_lora.py'): 'a module the test writes',
    ('tests/test_imports.py', 'a.py'): 'the package the cycle finder is tested on (written by the test)',
    ('tests/test_imports.py', 'b.py'): 'the package the cycle finder is tested on (written by the test)',
    ('tests/test_imports.py', 'c.py'): 'the package the cycle finder is tested on (written by the test)',
    ('tests/test_imports.py', 'fiat_jax.a'): 'the package the cycle finder is tested on (written by the test)',
    ('tests/test_imports.py', 'fiat_jax.b'): 'the package the cycle finder is tested on (written by the test)',
    ('tests/test_imports.py', 'fiat_jax.c'): 'the package the cycle finder is tested on (written by the test)',
}
SKIP_DIRS = {'.git', '.venv', 'build', 'dist', '__pycache__', '.pytest_cache', 'runs', 'demo_out'}


def _files() -> list[str]:
  try:
    out = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True, timeout=60)
    files = [f for f in out.stdout.decode('utf-8').split('\0') if f]
  except (OSError, subprocess.SubprocessError):
    files = []
  if not files:  # not a git checkout: walk the tree
    for dirpath, dirnames, filenames in os.walk(ROOT):
      dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith('.egg-info')]
      files += [os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, '/') for f in filenames]
  return sorted(f for f in files if os.path.isfile(os.path.join(ROOT, f)))


FILES = _files()
BASENAMES = {os.path.basename(f) for f in FILES}


def _texts():
  """(path, [lines]) of every text file but this one."""
  for rel in FILES:
    if rel == SELF:
      continue
    with open(os.path.join(ROOT, rel), 'rb') as f:
      data = f.read()
    if b'\0' in data:
      continue
    try:
      yield rel, data.decode('utf-8').splitlines()
    except UnicodeDecodeError:
      continue


TEXTS = list(_texts())


def _exists(path: str) -> bool:
  return os.path.exists(os.path.join(ROOT, path.rstrip('/')))


def _report(bad: list[str], what: str) -> str:
  return f'{len(bad)} {what} (file:line: reference):\n' + '\n'.join(f'  {b}' for b in bad)


def _allowed(rel: str, ref: str) -> bool:
  return (rel, ref) in ALLOWED


def test_the_repository_was_found():
  assert len(FILES) > 50 and 'README.md' in BASENAMES, f'{len(FILES)} files found under {ROOT}'
  assert len(TEXTS) > 50, f'{len(TEXTS)} text files read'


def test_no_internal_note_is_named():
  bad = [f'{rel}:{n}: {m.group(0)}' for rel, lines in TEXTS for n, line in enumerate(lines, 1)
         for m in NOTE_RE.finditer(line)]
  assert not bad, _report(bad, 'references to notes that are not in the repository; point them to docs/')


def _clean(ref: str) -> str:
  return ref.rstrip('.,:;')


def test_repository_paths_exist():
  bad = []
  for rel, lines in TEXTS:
    for n, line in enumerate(lines, 1):
      for m in PATH_RE.finditer(line):
        ref = _clean(m.group(1))
        if PLACEHOLDER.search(ref) or _allowed(rel, ref):
          continue
        if ref.startswith('fiat_jax/gin_configs') and _exists(ref[len('fiat_jax/'):]):
          continue  # where setup.py installs gin_configs/ inside the package
        if not _exists(ref):
          bad.append(f'{rel}:{n}: {ref}')
      for m in GIN_RE.finditer(line):
        ref = _clean(m.group(1))
        if PLACEHOLDER.search(ref) or _allowed(rel, ref):
          continue
        if not _exists(os.path.join('gin_configs', ref)) and not _exists(ref):
          bad.append(f'{rel}:{n}: {ref} (not in gin_configs/)')
  assert not bad, _report(bad, 'references to paths that do not exist')


def test_python_module_names_exist():
  bad = [f'{rel}:{n}: {m.group(1)}' for rel, lines in TEXTS for n, line in enumerate(lines, 1)
         for m in MODULE_RE.finditer(line)
         if m.group(1) not in BASENAMES and not _allowed(rel, m.group(1))]
  assert not bad, _report(bad, 'names of Python modules that no file of the repository has (moved or renamed?)')


DOTTED_RE = re.compile(r'(?<![\w.])((?:fiat_jax|tasks)(?:\.\w+)+)')


def _module_exists(dotted: str) -> bool:
  """`fiat_jax.data.pipeline.TaskData` exists if some prefix is a module and the packages above it exist; a name
  after a package that is no module must appear in the package's __init__.py (an attribute)."""
  parts = dotted.split('.')
  path = parts[0]
  for part in parts[1:]:
    if os.path.isfile(os.path.join(ROOT, path, part + '.py')):
      return True
    if os.path.isdir(os.path.join(ROOT, path, part)):
      path = os.path.join(path, part)
      continue
    init = os.path.join(ROOT, path, '__init__.py')
    if not os.path.isfile(init):
      return False
    with open(init, encoding='utf-8') as f:
      return re.search(r'\b' + re.escape(part) + r'\b', f.read()) is not None
  return True


def test_dotted_module_names_exist():
  bad = [f'{rel}:{n}: {m.group(1)}' for rel, lines in TEXTS for n, line in enumerate(lines, 1)
         for m in DOTTED_RE.finditer(line)
         if not m.group(1).startswith('fiat_jax.gin_configs')  # setup.py's package for gin_configs/
         and not _module_exists(m.group(1)) and not _allowed(rel, m.group(1))]
  assert not bad, _report(bad, 'dotted module names that no module of the repository has (moved or renamed?)')


def _anchors(path: str) -> set[str]:
  """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces as hyphens."""
  out = set()
  with open(path, encoding='utf-8') as f:
    in_code = False
    for line in f:
      if line.startswith('```'):
        in_code = not in_code
      elif not in_code and re.match(r'#{1,6} ', line):
        title = line.lstrip('#').strip().lower()
        out.add(re.sub(r'[^\w\- ]', '', title).replace(' ', '-'))
  return out


def test_markdown_links_resolve():
  bad = []
  for rel, lines in TEXTS:
    if not rel.endswith('.md'):
      continue
    in_code = False
    for n, line in enumerate(lines, 1):
      if line.startswith('```'):
        in_code = not in_code
      if in_code:
        continue
      for m in LINK_RE.finditer(line):
        target = m.group(1)
        if re.match(r'[a-z][a-z0-9+.\-]*:', target):  # http:, https:, mailto:
          continue
        path, _, anchor = target.partition('#')
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), path)) if path else os.path.join(ROOT, rel)
        if os.path.relpath(full, ROOT).startswith('..'):
          bad.append(f'{rel}:{n}: {target} (outside the repository)')
        elif not os.path.exists(full):
          bad.append(f'{rel}:{n}: {target} (no such file)')
        elif anchor and full.endswith('.md') and anchor not in _anchors(full):
          bad.append(f'{rel}:{n}: {target} (no heading with this anchor)')
  assert not bad, _report(bad, 'Markdown links that do not resolve')


@pytest.mark.parametrize('line,expected', [
    ('see docs/paper_rows.md.', ['docs/paper_rows.md']),
    ('https://github.com/x/y/tree/main/docs/z.md', []),
    ('runs/<setting>/<row>.gin and fiat_jax/data/', ['runs/<setting>/<row>.gin', 'fiat_jax/data/']),
])
def test_the_path_pattern(line, expected):
  found = [_clean(m.group(1)) for m in PATH_RE.finditer(line)] + [_clean(m.group(1)) for m in GIN_RE.finditer(line)]
  assert sorted(found) == sorted(expected), found
