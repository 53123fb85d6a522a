"""Every module imports on Python 3.9 (torch_npu 2.6 ships 3.9 wheels): 3.9's grammar, and no
`X | Y` annotation that Python evaluates (function signatures, module and class bodies such as
dataclass fields: a TypeError at import before 3.10) unless the module postpones annotations."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for p in ROOT.rglob('*.py') if not {'.git', 'data'} & set(p.relative_to(ROOT).parts))


def _evaluated_annotations(tree):
    """The annotations Python evaluates when the module runs (not those of local variables)."""
    def body_annotations(body):
        for node in body:
            if isinstance(node, ast.AnnAssign):
                yield node.annotation
            elif isinstance(node, ast.ClassDef):
                yield from body_annotations(node.body)
            elif isinstance(node, (ast.If, ast.Try)):
                yield from body_annotations(node.body + node.orelse)
    yield from body_annotations(tree.body)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            args = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
            yield from filter(None, [node.returns, *(arg.annotation for arg in args)])


def _postponed(tree):
    return any(isinstance(n, ast.ImportFrom) and n.module == '__future__' and
               any(a.name == 'annotations' for a in n.names) for n in tree.body)


def _has_union(annotation):
    return any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation))


@pytest.mark.parametrize('path', MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_imports_on_python_39(path):
    tree = ast.parse(path.read_text(), str(path), feature_version=(3, 9))
    unions = [a.lineno for a in _evaluated_annotations(tree) if _has_union(a)]
    assert not unions or _postponed(tree), f'{path.name}: X | Y annotations on lines {unions}'


def test_the_check_finds_a_dataclass_union():
    source = 'import dataclasses\n@dataclasses.dataclass\nclass S:\n    q: int | None = None\n'
    assert [_has_union(a) for a in _evaluated_annotations(ast.parse(source))] == [True]
    assert not _postponed(ast.parse(source)) and _postponed(ast.parse('from __future__ import annotations\n' + source))
    assert list(_evaluated_annotations(ast.parse('def f():\n    x: int | None = 1\n'))) == []   # never evaluated
