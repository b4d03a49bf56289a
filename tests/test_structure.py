"""The code's shape: data flows one way, so no module imports another that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llmsched_env", "baselines", "agents", "live_backend")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module → the project's modules it imports (at any depth of its code; ``if TYPE_CHECKING:`` blocks,
    which never run, excluded). ``from package import name`` points at ``package.name`` when that is a module."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if target in modules:
                        graph[name].add(target)
                    elif node.module in modules:
                        graph[name].add(node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names if alias.name in modules)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = import_graph()
    assert "llmsched_env.vector" in graph and "llmsched_env.env" in graph["llmsched_env.vector"]
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]


#: NamedTuple's own methods (underscored so that they cannot clash with field names).
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}
#: Private names of other libraries the project must use, each with its reason.
ALLOWED_FOREIGN = {
    ("live_backend/vllm_adapter.py", "_preempt_request"): "vLLM's Scheduler: its one entry point for eviction",
}


def private_names_in(source: str, relative: str) -> list[str]:
    """In one file's ``source``: every ``x._name`` where ``x`` is not ``self``, ``cls`` or ``super()``, and every
    ``from m import _name`` (``path:line: code``), less the allowed foreign names."""
    found = []
    for node in ast.walk(ast.parse(source, filename=relative)):
        if isinstance(node, ast.Attribute):
            name, base = node.attr, node.value
            if not name.startswith("_") or name.startswith("__") or name in NAMEDTUPLE_API:
                continue
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                continue
            if (relative, name) in ALLOWED_FOREIGN:
                continue
            found.append(f"{relative}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom):
            found += [f"{relative}:{node.lineno}: from {node.module} import {alias.name}"
                      for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def private_accesses() -> list[str]:
    """:func:`private_names_in` over the project's packages and benchmarks."""
    found = []
    for package in (*PACKAGES, "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            found += private_names_in(path.read_text(), path.relative_to(ROOT).as_posix())
    return found


def test_no_module_reads_another_objects_private_names() -> None:
    assert private_accesses() == []


def test_the_private_name_scan_finds_what_it_must() -> None:
    source = ("from llmsched_env.kernels import _claim\n"
              "def f(engine, t):\n"
              "    self._ok = super()._ok2 + engine._n + t._replace(a=1).a\n")
    assert private_names_in(source, "x.py") == ["x.py:1: from llmsched_env.kernels import _claim",
                                                "x.py:3: engine._n"]


COMPILING_DECORATORS = ("compiled", "compiled_inlined", "compiled_parallel", "numba.njit", "njit")


def functions_decorated(decorators: tuple[str, ...]) -> Iterator[tuple[Path, ast.FunctionDef]]:
    """Every function of the project's packages with one of ``decorators`` (by name, arguments aside)."""
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    ast.unparse(d).split("(")[0] in decorators for d in node.decorator_list):
                yield path, node


def test_compiled_functions_take_at_most_ten_parameters() -> None:
    # A compiled function takes a few typed structures (RequestColumns, EpisodeParams, InterfaceParams, LoopState,
    # ObservationScales), not long lists of arrays that must be kept in order at every call.
    too_many = []
    for path, node in functions_decorated(COMPILING_DECORATORS):
        count = len(node.args.posonlyargs) + len(node.args.args) + len(node.args.kwonlyargs)
        if count > 10:
            too_many.append(f"{path.relative_to(ROOT)}: {node.name} takes {count}")
    assert too_many == []


def borrowed_views_outside_calls(source: str, filename: str, inlined: frozenset[str] = frozenset()) -> list[str]:
    """Where ``borrowed(...)`` is used other than as an argument of a call to a function that is not inlined
    (``inlined``: the names of the ``compiled_inlined`` functions): assigned, returned, stored, or handed to a
    function whose body becomes the caller's.

    Numba's dead-code elimination drops a store into an array it cannot tell aliases an argument of the function,
    and it cannot tell that of a view a call returned: a function that borrows and writes would lose its writes. A
    borrowed view therefore enters a function only as its argument (``llmsched_env.compiled.borrowed``), and a
    function inlined into its caller takes none (inlined, its arguments are the caller's variables)."""
    tree = ast.parse(source, filename=filename)
    arguments = {id(arg) for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and ast.unparse(node.func).split(".")[-1] not in inlined for arg in node.args}
    return [f"{filename}:{node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "borrowed"
            and id(node) not in arguments]


def test_borrowed_views_are_only_handed_to_calls() -> None:
    inlined = frozenset(node.name for _, node in functions_decorated(("compiled_inlined",)))
    assert {"iterate", "carry_batch"} <= inlined
    misuse = []
    for path in _modules().values():
        misuse += borrowed_views_outside_calls(path.read_text(), str(path.relative_to(ROOT)), inlined)
    assert misuse == []


def test_the_borrowed_view_scan_finds_what_it_must() -> None:
    source = ("def f(a, b):\n"
              "    return g(borrowed(a), b)\n"
              "def h(a):\n"
              "    a = borrowed(a)\n"
              "    return compiled.borrowed(a)\n"
              "def k(a):\n"
              "    return inlined_rule(borrowed(a))\n")
    assert borrowed_views_outside_calls(source, "x.py", frozenset({"inlined_rule"})) == [
        "x.py:4: borrowed(a)", "x.py:5: compiled.borrowed(a)", "x.py:7: borrowed(a)"]
