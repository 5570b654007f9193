"""Problem details are plain text: a person reads them (the connect page shows them as they are),
so no Markdown — above all no backticks — in any `detail` the auth service can send."""

from __future__ import annotations

import ast
from pathlib import Path

import services.auth
from services.auth import errors

AUTH_DIR = Path(services.auth.__file__).resolve().parent


def _error_classes() -> list[type[errors.AuthError]]:
    found, todo = [], [errors.AuthError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_default_details_are_plain_text() -> None:
    classes = _error_classes()
    assert len(classes) > 15
    for cls in classes:
        assert "`" not in cls.default_detail, cls.__name__


def test_details_raised_in_the_code_are_plain_text() -> None:
    """Every string literal (or f-string part) handed to an AuthError subclass in services/auth."""
    names = {cls.__name__ for cls in _error_classes()}
    offenders = []
    checked = 0
    for path in sorted(AUTH_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names):
                continue
            for arg in [*node.args, *(k.value for k in node.keywords if k.arg == "detail")]:
                for part in ast.walk(arg):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        checked += 1
                        if "`" in part.value:
                            offenders.append(f"{path.name}:{node.lineno}: {part.value!r}")
    assert checked > 20
    assert offenders == []
