"""The layout holds: no import circle in bootdiff/ or ray_jobs/, no Ray in the library, and every
module, file or dotted name that the docs and docstrings cite exists (README.md's map,
docs/CONTRACTS.md, docs/METHOD.md, docs/RAY.md, cluster/README.md, and every docstring and
comment under bootdiff/, ray_jobs/ and benchmarks/)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("bootdiff", "ray_jobs")
DOCS = ("README.md", "docs/CONTRACTS.md", "docs/METHOD.md", "docs/RAY.md", "cluster/README.md")
CODE = ("bootdiff", "ray_jobs", "benchmarks")


def _modules() -> dict:
    """Module name -> file, for every .py under the packages."""
    out = {}
    for root in PACKAGES:
        for d, _, files in os.walk(os.path.join(REPO, root)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def import_graph(mods: dict) -> dict:
    """Module -> the project modules it imports (top-level and nested imports alike; a module's
    own parent packages are not edges: importing ``a.b`` runs ``a/__init__`` first anyway)."""

    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = {}
    for m, path in mods.items():
        pkg = m if path.endswith("__init__.py") else m.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                for a in node.names:  # `from pkg import mod` imports pkg.mod; `from mod import name`, mod
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
        edges[m] = {r for r in map(resolve, targets) if r and r != m and not m.startswith(r + ".")}
    return edges


def cycles(edges: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_and_no_ray_in_the_library():
    mods = _modules()
    assert {"bootdiff.config", "bootdiff.views", "bootdiff.evaluation.evaluate", "bootdiff.distill.student",
            "bootdiff.efficiency.run", "ray_jobs.pipeline"} <= set(mods)
    edges = import_graph(mods)
    assert cycles(edges) == []
    for m, path in mods.items():
        if m.startswith("bootdiff"):
            src = open(path, encoding="utf-8").read()
            assert not re.search(r"^\s*(import ray|from ray)\b", src, re.M), f"{path} imports ray"
            assert not any(t.startswith("ray_jobs") for t in edges[m]), f"{path} imports ray_jobs"


# README.md's map, in the data's order: a module may import its own row, the rows above it and
# the shared helpers, never a row below it.
ROWS = [("bootdiff.config",), ("bootdiff.views",), ("bootdiff.data",),
        ("bootdiff.precond", "bootdiff.nets", "bootdiff.losses", "bootdiff.augment", "bootdiff.schedules", "bootdiff.train",
         "bootdiff.checkpoint", "bootdiff.stopping"),
        ("bootdiff.fusion",), ("bootdiff.residual", "bootdiff.sweep", "bootdiff.memo"), ("bootdiff.export",),
        ("bootdiff.samplers",), ("bootdiff.experiment",), ("bootdiff.peers",), ("bootdiff.evaluation", "bootdiff.ensemble"), ("bootdiff.distill",),
        ("bootdiff.efficiency",)]
SHARED = ("bootdiff.util", "bootdiff.run", "bootdiff.errors")  # URLs and atomic writes, a run's files


def _row(m: str):
    for r, names in enumerate(ROWS):
        if any(m == n or m.startswith(n + ".") for n in names):
            return r
    return None


def test_library_imports_point_down_the_stage_order():
    """No module imports a later stage: README.md's map, top to bottom."""
    mods = _modules()
    unplaced = [m for m in mods if m.startswith("bootdiff.") and _row(m) is None
                and not any(m == n or m.startswith(n + ".") for n in SHARED)]
    assert not unplaced, f"modules outside README.md's map: {unplaced}"
    upward = []
    for m, targets in import_graph(mods).items():
        if not m.startswith("bootdiff.") or _row(m) is None:
            continue
        for t in targets:
            if t == "bootdiff" or any(t == n or t.startswith(n + ".") for n in SHARED):
                continue
            # the one upward edge: config's load-time check asks the views, the feature network
            # and a named benchmark (eval.benchmark) whether a config fits them, before any work
            allowed = m == "bootdiff.config.check" and t in ("bootdiff.views", "bootdiff.evaluation.fd",
                                                              "bootdiff.evaluation.worth")
            if _row(t) > _row(m) and not allowed:
                upward.append(f"{m} -> {t}")
    assert not upward, "imports of a later stage:\n" + "\n".join(sorted(upward))


def _cited_text():
    for rel in DOCS:
        yield rel, open(os.path.join(REPO, rel), encoding="utf-8").read()
    for root in CODE:
        for d, _, files in os.walk(os.path.join(REPO, root)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    yield os.path.relpath(path, REPO), open(path, encoding="utf-8").read()


PATH = re.compile(r"(?<![\w/.])((?:bootdiff|ray_jobs|benchmarks|tests|scripts|configs|cluster|docs)/[\w/.-]*\.(?:py|md|yaml|sh))")
DOTTED = re.compile(r"(?<![\w./])((?:bootdiff|ray_jobs)(?:\.\w+)+)")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            if importlib.util.find_spec(name) is None:
                continue
        except ModuleNotFoundError:
            continue
        obj = importlib.import_module(name)
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_docs_and_docstrings_name_only_what_exists():
    missing = []
    for where, text in _cited_text():
        for p in set(PATH.findall(text)):
            if not os.path.exists(os.path.join(REPO, p.rstrip("."))):
                missing.append(f"{where}: {p}")
        for d in set(DOTTED.findall(text)):
            d = d.rstrip(".")
            if d.endswith((".py", ".md", ".yaml", ".json")) or not _resolves(d):
                if not d.endswith((".py", ".md", ".yaml", ".json")):
                    missing.append(f"{where}: {d}")
    assert not missing, "cited but missing:\n" + "\n".join(sorted(missing))
