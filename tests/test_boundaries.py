"""Import boundaries: one module (or a named few) owns each heavy dependency, so that swapping or
upgrading it touches one room. Read from the source with ``ast`` (lazy imports inside functions
count too)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# top-level package -> the modules (paths under daemon/) that may import it
OWNERS: dict[str, set[str]] = {
    "onnxruntime": {"pipeline/sessions.py"},
    # the derivations: models/derive.py rewrites CenterFace for dynamic shapes, dlibnet.py builds its graph
    "onnx": {"pipeline/sessions.py", "models/derive.py", "dlibnet.py"},
    "yaml": {"config.py"},
    "watchdog": {"watch.py"},
    "scipy": {"identity.py"},
    # the review page (daemon/web/): the page modules, and lazily where the app is built or answers
    "starlette": {"web/__init__.py", "web/security.py", "web/state.py", "web/faces.py", "web/images.py", "web/stats.py", "web/media.py", "web/persons.py"},
    "jinja2": {"web/state.py"},
    "uvicorn": {"web/serve.py"},
    "psycopg": set(),  # only through SQLAlchemy's URL
    "torch": set(),  # training/ only
    # debt: web/media.py resizes previews itself instead of through render.py
    "cv2": {"pipeline/images.py", "pipeline/align.py", "render.py", "web/media.py"},
    "pillow_heif": {"pipeline/heif.py"},
    "av": {"pipeline/video.py"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_each_heavy_dependency_has_its_owners() -> None:
    bad = []
    for path in sorted((REPO / "daemon").rglob("*.py")):
        rel = path.relative_to(REPO / "daemon").as_posix()
        for top in _imports(path) & set(OWNERS):
            if rel not in OWNERS[top]:
                bad.append(f"daemon/{rel} imports {top} (owned by {sorted(OWNERS[top]) or 'no daemon module'})")
    assert not bad, "import boundaries crossed:\n" + "\n".join(bad)


def test_the_library_never_prints() -> None:
    """``print`` belongs to the command-line modules only."""
    cli = {"service.py", "service_health.py", "models/cli.py", "evaluate.py", "web/serve.py"}
    bad = []
    for path in sorted((REPO / "daemon").rglob("*.py")):
        rel = path.relative_to(REPO / "daemon").as_posix()
        if rel in cli or rel.startswith("cli/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"daemon/{rel}:{node.lineno}")
    assert not bad, f"print outside the command-line modules: {bad}"


def test_only_the_cli_imports_the_cli() -> None:
    """``daemon.cli`` imports the modules whose commands it runs (lazily); none of them imports it
    back, so the command package stays the edge and no import cycle runs through it."""
    bad = []
    for path in sorted((REPO / "daemon").rglob("*.py")):
        rel = path.relative_to(REPO / "daemon").as_posix()
        if rel.startswith("cli/"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            if any(n == "daemon.cli" or n.startswith("daemon.cli.") for n in names):
                bad.append(f"daemon/{rel}:{node.lineno}")
    assert not bad, f"modules outside daemon/cli/ that import it: {bad}"
