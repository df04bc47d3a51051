"""The module map README's layout table states: every top-level module is listed, and each imports only the
modules listed above it (no module imports one above it in the stack)."""
import ast
import re

from _train_fixtures import REPO


def layout():
    """Module names in the order of README's layout table (`a.py` rows; 'serve.py, serve.html' counts serve)."""
    table = (REPO / 'README.md').read_text().split('## Layout', 1)[1]
    return re.findall(r'^\| `(\w+)\.py`', table, re.M)


def project_imports(path, modules):
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split('.')[0])
    return found & modules


def test_every_module_imports_only_modules_above_it():
    order = layout()
    modules = {path.stem for path in REPO.glob('*.py')}
    assert sorted(order) == sorted(modules)  # every top-level module has its row, and only those
    for k, name in enumerate(order):
        above = set(order[:k])
        wrong = project_imports(REPO / f'{name}.py', modules) - above - {name}
        assert not wrong, f'{name}.py imports {sorted(wrong)}, listed below it in README'
