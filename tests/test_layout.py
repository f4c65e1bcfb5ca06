"""The tree shows who runs what: the coordinator's side and a site's side never import each
other, the library never imports the app folders, and the README's Layout names every
module. Imports are read from the source (every import statement, also those inside
functions), so a lazy import cannot hide a crossing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "fedslm"


def _imports(path: Path) -> set[str]:
    """Every module an import statement in `path` names (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _crossings(folder: Path, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(ROOT)} imports {m}" for p in _modules(folder) for m in sorted(_imports(p))
            if m.split(".")[0] in forbidden or any(m == f or m.startswith(f + ".") for f in forbidden)]


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "fedslm" / "site"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from fedslm.server import run\n    from ..server.strategy import S\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert {"fedslm.server", "fedslm.server.run", "fedslm.server.strategy"} <= _imports(pkg / "x.py")


def test_site_and_server_never_import_each_other():
    assert _crossings(LIBRARY / "site", ("fedslm.server",)) == []
    assert _crossings(LIBRARY / "server", ("fedslm.site",)) == []


def test_the_library_never_imports_the_app_folders():
    assert _crossings(LIBRARY, ("server", "client", "simulations")) == []


def test_every_subpackage_says_what_it_owns():
    for init in LIBRARY.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.relative_to(ROOT)} has no docstring saying what it owns"


def _layout_entries(readme: str) -> tuple[set[str], set[str]]:
    """(modules, whole folders) the README's Layout names: `fedslm/x.py` lines, indented
    `name.py` lines under a `fedslm/pkg/` header, and a header with a description of its
    own stands for the whole folder (fedslm/data/)."""
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.index("\n## ", 1)]
    modules, described, listed, current = set(), set(), set(), None
    for line in layout.splitlines():
        tokens = line.split()
        if not tokens:
            continue
        if tokens[0].startswith("fedslm/") and tokens[0].endswith("/"):
            current = tokens[0]
            if len(tokens) > 1:
                described.add(current)
        elif tokens[0].startswith("fedslm/") and tokens[0].endswith(".py"):
            modules.add(tokens[0])
        elif line.startswith("  ") and tokens[0].endswith(".py") and current:
            modules.add(current + tokens[0])
            listed.add(current)
    # a header stands for its whole folder only when no module of it is listed: a folder
    # that lists its modules must list every one
    return modules, described - listed


def test_the_readme_layout_names_every_module():
    modules, folders = _layout_entries((ROOT / "README.md").read_text())
    present = {p.relative_to(ROOT).as_posix() for p in _modules(LIBRARY) if p.name != "__init__.py"}
    missing = sorted(m for m in present if m not in modules and not any(m.startswith(f) for f in folders))
    assert missing == [], f"README Layout does not name: {missing}"
    assert sorted(modules - present) == [], "README Layout names modules that do not exist"


@pytest.mark.parametrize("app", ["server/app.py", "client/app.py"])
def test_the_flower_apps_are_thin(app):
    """The app objects only wire the library in: no training or aggregation code there."""
    tree = ast.parse((ROOT / app).read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert sum(len(ast.unparse(f).splitlines()) for f in functions) < 60


def test_the_layout_reader_holds_a_listing_folder_to_every_module():
    readme = ("## Layout\n```\nfedslm/site/   a site\n  handlers.py   x\nfedslm/data/   shared: all of data\n```\n"
              "## Next\n")
    modules, folders = _layout_entries(readme)
    assert modules == {"fedslm/site/handlers.py"} and folders == {"fedslm/data/"}
