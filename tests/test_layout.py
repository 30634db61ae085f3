"""The dependency rules of ARCHITECTURE.md, checked on the real import graph of src/fluxion.

Every `import` / `from ... import` anywhere in a module counts, including imports inside functions (a lazy import
is still a dependency), and rules apply to what a module reaches transitively: if sampling/ imports a helper that
imports train/, sampling/ depends on train/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fluxion"

CORE = ("model", "vae", "text", "sampling")
FRONT_ENDS = ("train", "serve", "curate", "cli", "repl")
RULES = [  # (modules under these, may never reach modules under these)
    *((f"fluxion.{c}", FRONT_ENDS) for c in CORE),
    *(
        (f"fluxion.{c}", ("train", "serve", "curate", "cli", "repl", "evaluate"))
        for c in ("editing", "lora", "quant")
    ),
    ("fluxion.serve", ("train", "curate")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """fluxion modules named by the imports in `path` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m == "fluxion" or m.startswith("fluxion.")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for m in imports_of(path, name):
            while m and m not in modules:  # `from fluxion.x import func` names a function, not a module
                m = m.rpartition(".")[0]
            if m and m != name:
                targets.add(m)
        edges[name] = targets
    return edges


def reach(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every module reachable from start."""
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen and nxt != start:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def path_to(edges: dict[str, set[str]], start: str, goal: str) -> list[str]:
    prev, todo = {start: None}, [start]
    while todo:
        cur = todo.pop(0)
        if cur == goal:
            out = []
            while cur:
                out.append(cur)
                cur = prev[cur]
            return out[::-1]
        for nxt in sorted(edges.get(cur, ())):
            if nxt not in prev:
                prev[nxt] = cur
                todo.append(nxt)
    return []


def under(module: str, area: str) -> bool:
    return module == area or module.startswith(area + ".")


EDGES = graph()


def violations(edges: dict[str, set[str]], source: str, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for module in sorted(m for m in edges if under(m, source)):
        for target in sorted(reach(edges, module)):
            if any(under(target, f"fluxion.{f}") for f in forbidden):
                out.append(" -> ".join(path_to(edges, module, target)))
    return out


@pytest.mark.parametrize("source,forbidden", RULES, ids=[r[0] for r in RULES])
def test_dependency_rule(source, forbidden):
    found = violations(EDGES, source, forbidden)
    assert not found, "\n".join(found)


def test_the_graph_is_real():
    """The parser sees the imports that exist (else every rule would pass vacuously)."""
    assert "fluxion.model.transformer" in EDGES["fluxion.sampling.denoise"]
    assert "fluxion.sampling.pipeline" in EDGES["fluxion.repl"]  # a lazy import inside a function
    assert "fluxion.train.train" in EDGES["fluxion.cli"]
    assert path_to(EDGES, "fluxion.cli", "fluxion.model.transformer")


def test_a_transitive_violation_is_caught(tmp_path):
    """The checker on a copy of the graph with one extra lazy import deep inside: sampling -> ... -> train."""
    edges = {k: set(v) for k, v in EDGES.items()}
    edges["fluxion.images"].add("fluxion.train.train")
    found = violations(edges, "fluxion.sampling", ("train",))
    assert any(chain.endswith("fluxion.images -> fluxion.train.train") for chain in found)
