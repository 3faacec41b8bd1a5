"""The rednet package imports one way: no module imports (even inside a function) one that imports it back."""
import ast
from pathlib import Path

import torch

from rednet.ops import not_eager

PACKAGE = Path(__file__).resolve().parents[1] / 'rednet'


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _import_graph():
    modules = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == '__init__.py' else name.rpartition('.')[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                    base = '.'.join(anchor + ([node.module] if node.module else []))
                subs = [f'{base}.{a.name}' for a in node.names if f'{base}.{a.name}' in modules]
                targets.update(subs if len(subs) == len(node.names) else subs + [base])
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = 'open'
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 'done'
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    graph = _import_graph()
    assert 'rednet.ops._common' in graph and graph['rednet.ops.fused'] >= {'rednet.ops._common'}
    assert _cycle(graph) is None, ' -> '.join(_cycle(graph))


def test_the_cycle_finder_sees_function_local_imports():
    graph = {'a': {'b'}, 'b': {'a'}, 'c': set()}
    assert _cycle(graph) == ['a', 'b', 'a']
    assert 'rednet.weights' in _import_graph()['rednet.model']  # model.py's hooks read files through weights.py


def test_not_eager_while_tracing_only():
    seen = []

    def double(x):
        seen.append((not_eager(), not_eager(compiling=True)))
        return x * 2

    double(torch.ones(1))
    torch.jit.trace(double, torch.ones(1), check_trace=False)
    assert seen == [(False, False), (True, True)]
