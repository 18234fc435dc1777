"""The package's layers, as docs/architecture.md draws them: imports go one way only.

    app (app.py, __init__.py)       the routes, and the choice of an engine
    engines (chatapp/engines/)      what carries the chat: in-process, Redis
    chat (chatapp/chat/)            messages, commands, codecs, peers, rooms, the hub
    transport (chatapp/transport/)  frames, the socket, one connection's pumps

A layer imports from those below it, never from one above; config.py and metrics.py are
leaves every layer may use, and they import nothing of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "chatapp"
LAYERS = ("transport", "chat", "engines", "app")
LEAVES = ("chatapp.config", "chatapp.metrics")


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "app"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def imports_of(module: str, is_package: bool, source: str) -> set[str]:
    """The chatapp modules a module imports, relative imports resolved (type-only ones too)."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("chatapp")}


def violations(module: str, imported: set[str]) -> list[str]:
    """What of a module's imports breaks the layering."""
    if module in LEAVES:
        return [f"{module} (a leaf) imports {name}" for name in sorted(imported)]
    return [
        f"{module} ({layer_of(module)}) imports {name} ({layer_of(name)})"
        for name in sorted(imported)
        if not any(name == leaf or name.startswith(leaf + ".") for leaf in LEAVES)
        and LAYERS.index(layer_of(name)) > LAYERS.index(layer_of(module))
    ]


def test_imports_go_down_the_layers_only() -> None:
    """No module imports from a layer above its own; the leaves import nothing of ours."""
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        wrong += violations(module, imports_of(module, path.name == "__init__.py", path.read_text()))
    assert wrong == []


def test_the_check_sees_an_import_running_back_up() -> None:
    """The check itself: the transport importing the hub, the chat an engine, and a leaf
    anything of ours are each caught; the chat importing the transport is not."""
    probe = "chatapp.transport.probe"
    assert violations(probe, imports_of(probe, False, "from ..chat.hub import Hub\n"))
    probe = "chatapp.chat.probe"
    assert violations(probe, imports_of(probe, False, "from ..engines import redis\n"))
    assert not violations(probe, imports_of(probe, False, "from ..transport import frames\n"))
    assert violations("chatapp.metrics", imports_of("chatapp.metrics", False, "from .chat import hub\n"))
