"""Imports point one way: each package imports only itself and the packages below it.

    slurmserve (config, the job secret and registry, shared utilities)
      ← kvfabric ← runtime ← router ← launcher ← gateway ← tools ← bench

Lazy imports inside functions count too: they hid the cycles this test now forbids. The two entry
points, `python -m slurmserve` and the `slurmserve` CLI, gather every command and may import any
package.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["slurmserve", "kvfabric", "runtime", "router", "launcher", "gateway", "tools", "bench"]
ENTRY_POINTS = {"slurmserve/__main__.py", "launcher/cli.py"}


def imported_packages(path: Path):
    """(line, package) of every slurmserve.* import in a file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "slurmserve":
                yield node.lineno, parts[1] if len(parts) > 1 and parts[1] in LAYERS else "slurmserve"


def test_every_import_points_down():
    rank = {p: i for i, p in enumerate(LAYERS)}
    upward = []
    for package in LAYERS:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            if rel in ENTRY_POINTS:
                continue
            for line, target in imported_packages(path):
                if rank[target] > rank[package]:
                    upward.append(f"{rel}:{line} imports slurmserve.{target}")
    assert upward == [], "imports that point up:\n" + "\n".join(sorted(set(upward)))


def test_the_check_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from slurmserve.router.head import Head\n")
    assert set(imported_packages(probe)) == {(2, "router")}
