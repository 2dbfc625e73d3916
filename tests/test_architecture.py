"""The import contract: stages import only downstream, and no two modules import each other (directly or around a
cycle). Imports inside functions count: hiding one there does not make the dependency go away.

    base (errors, io, config, progress) <- data <- features <- ops <- models <- objectives <- evaluation
        <- training <- runs <- inference / retrieval / ranking <- serving <- quickstart, daily <- api <- cli

Also: no source file over 450 lines, except a model file (which may read better whole).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
RANK = {"errors": 0, "io": 0, "config": 0, "progress": 0, "version": 0, "data": 1, "features": 2, "nn": 3, "ops": 3, "models": 4,
        "objectives": 5, "evaluation": 6, "training": 7, "distributed": 7, "runs": 8, "inference": 9, "retrieval": 9,
        "ranking": 9, "serving": 10, "quickstart": 11, "daily": 11, "api": 12, "cli": 13}
MAX_LINES = 450


def modules(src: Path) -> dict[str, Path]:
    out = {}
    for f in (src / "pinnerformer").rglob("*.py"):
        name = ".".join(f.relative_to(src).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, anywhere in the file, resolved to modules that exist."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            cands = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        for c in cands:
            while c and c not in known:  # pinnerformer.x.y.Class -> pinnerformer.x.y
                c = c.rsplit(".", 1)[0] if "." in c else ""
            if c.startswith("pinnerformer") and c != name and not (c != "pinnerformer" and name.startswith(c + ".")):
                targets.add(c)
    return targets


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def contract_problems(src: Path) -> list[str]:
    known = modules(src)
    graph = {m: imports_of(m, p, known) for m, p in known.items()}
    problems = []
    for m, targets in sorted(graph.items()):
        if stage(m) and stage(m) not in RANK:
            problems.append(f"{m}: stage '{stage(m)}' has no place in the contract (add it to RANK)")
        for t in sorted(targets):
            a, b = RANK.get(stage(m), 99), RANK.get(stage(t), -1)
            if stage(m) and b > a:
                problems.append(f"upstream import: {m} ({stage(m)}) imports {t} ({stage(t)})")
    # cycles between files (strongly connected components of more than one module)
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    problems += [f"import cycle: {' <-> '.join(c)}" for c in comps]
    # cycles between stages (same-rank stages may import each other in one direction only)
    edges = defaultdict(set)
    for m, targets in graph.items():
        for t in targets:
            if stage(m) and stage(t) and stage(m) != stage(t):
                edges[stage(m)].add(stage(t))
    problems += [f"stage cycle: {a} <-> {b}" for a in sorted(edges) for b in sorted(edges[a]) if a < b and a in edges[b]]
    for m, p in sorted(known.items()):
        n = len(p.read_text().splitlines())
        if n > MAX_LINES and stage(m) != "models":
            problems.append(f"long file: {p.relative_to(src)} has {n} lines (at most {MAX_LINES} outside models/)")
    return problems


def test_the_package_keeps_the_import_contract():
    problems = contract_problems(SRC)
    assert not problems, "\n".join(problems)


def test_the_contract_check_finds_upstream_imports_cycles_and_long_files(tmp_path):
    pkg = tmp_path / "pinnerformer"
    for folder in ("data", "training", "evaluation", "newstage"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "reader.py").write_text("def f():\n    from pinnerformer.training.loop import fit  # hidden\n")
    (pkg / "training" / "loop.py").write_text("from pinnerformer.evaluation import score\nfit = 1\n")
    (pkg / "evaluation" / "score.py").write_text("from ..training import loop\n" + "x = 1\n" * 460)
    (pkg / "newstage" / "thing.py").write_text("import pinnerformer.data.reader\n")
    problems = contract_problems(tmp_path)
    assert "upstream import: pinnerformer.data.reader (data) imports pinnerformer.training.loop (training)" in problems
    assert "upstream import: pinnerformer.evaluation.score (evaluation) imports pinnerformer.training.loop " \
           "(training)" in problems
    assert "import cycle: pinnerformer.evaluation.score <-> pinnerformer.training.loop" in problems
    assert "stage cycle: evaluation <-> training" in problems
    assert "pinnerformer.newstage.thing: stage 'newstage' has no place in the contract (add it to RANK)" in problems
    assert any(p.startswith("long file: pinnerformer/evaluation/score.py has 461 lines") for p in problems)
