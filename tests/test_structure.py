"""The shape of the code: imports flow one way, modules and functions stay readable."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob('*.py')} | {f'configs.{p.stem}': p for p in (ROOT / 'configs').glob('*.py')}
# entry points, then the library they share; a module imports only from its own layer or below
LAYERS = [{m for m in MODULES if m.startswith('configs.')}, {'bench'}, {'train', 'prepare'}, {'trainstep', 'evaluate'},
          {'data', 'weights'}, {'text', 'images', 'runtime', 'declip', 'losses'}]


def project_imports(path):
    """Names of this project's modules that `path` imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES}
    return found


def layer(module):
    return next(i for i, members in enumerate(LAYERS) if module in members)


def test_every_module_has_a_layer():
    assert all(any(m in members for members in LAYERS) for m in MODULES), MODULES


def test_imports_flow_one_way_without_cycles():
    graph = {m: project_imports(p) - {m} for m, p in MODULES.items()}
    for module, deps in graph.items():
        for dep in deps:
            assert layer(dep) >= layer(module), f'{module} imports {dep}, which is above it'
    visiting, done = set(), set()

    def visit(m, path):
        assert m not in visiting, f'import cycle: {" -> ".join(path + [m])}'
        if m in done:
            return
        visiting.add(m)
        for dep in graph[m]:
            visit(dep, path + [m])
        visiting.discard(m)
        done.add(m)
    for m in graph:
        visit(m, [])


def test_no_module_imports_train():
    """train.py is an entry point; bench.py times trainstep.train_step, the very step its loop runs."""
    importers = {m for m, p in MODULES.items() if 'train' in project_imports(p) and m != 'train'}
    assert not importers
    assert 'trainstep' in project_imports(MODULES['bench']) and 'trainstep' in project_imports(MODULES['train'])


@pytest.mark.parametrize('module', sorted(MODULES))
def test_modules_and_functions_are_short(module):
    source = MODULES[module].read_text()
    assert len(source.splitlines()) <= 600, f'{module}: {len(source.splitlines())} lines'
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f'{module}.{node.name}: {length} lines'


def test_no_citations_of_documents_outside_the_repository():
    import re
    pattern = re.compile(r'reference (section )?\d|spec\'s section|DESIGN \d|section \d+\.\d+')
    for module, path in MODULES.items():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line), f'{path.name}:{n}: {line.strip()}'
