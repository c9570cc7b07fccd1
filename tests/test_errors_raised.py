"""Every error the package raises is one of its own classes (neural_mechanics.errors).

Each class there subclasses both NeuralMechanicsError and the builtin of the same meaning, so
``except ValueError`` keeps working and ``except NeuralMechanicsError`` catches everything. This
test reads the package's source with ``ast`` and fails on any ``raise`` of a builtin exception
class outside errors.py. Allowed: ``NotImplementedError`` (an abstract method) and
``AttributeError`` inside ``__getattr__`` (the protocol asks for exactly that).
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "neural_mechanics"
BUILTIN_ERRORS = {name for name, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
ALLOWED_EVERYWHERE = {"NotImplementedError"}
ALLOWED_IN = {"AttributeError": {"__getattr__"}}


def builtin_raises(source: str) -> list[tuple[int, str, str]]:
    """(line, exception class, enclosing function) of every raise of a builtin exception class
    that the rules above do not allow."""
    found: list[tuple[int, str, str]] = []

    def walk(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(child, child.name)
                continue
            if isinstance(child, ast.Raise) and child.exc is not None:
                exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                name = exc.id if isinstance(exc, ast.Name) else exc.attr if isinstance(exc, ast.Attribute) and isinstance(exc.value, ast.Name) and exc.value.id == "builtins" else None
                if name in BUILTIN_ERRORS and name not in ALLOWED_EVERYWHERE and function not in ALLOWED_IN.get(name, set()):
                    found.append((child.lineno, name, function))
            walk(child, function)

    walk(ast.parse(source), "<module>")
    return found


def test_the_package_raises_only_its_own_error_classes():
    findings = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for line, name, function in builtin_raises(path.read_text(encoding="utf-8")):
            findings.append(f"{path.relative_to(PACKAGE.parent)}:{line}: raise {name} (in {function}); use a class of neural_mechanics.errors")
    assert not findings, "\n".join(findings)


def test_every_error_class_is_a_library_error_and_a_builtin():
    from neural_mechanics import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.NeuralMechanicsError), name
        if cls is not errors.NeuralMechanicsError:
            assert any(b.__name__ in BUILTIN_ERRORS and b is not Exception for b in cls.__mro__[1:]), f"{name} subclasses no specific builtin"


def test_the_walker_flags_builtin_raises_and_allows_the_exceptions():
    source = (
        "import builtins\n"
        "def f(x):\n"
        "    if x:\n"
        "        raise ValueError('bad')\n"
        "    raise builtins.KeyError(x) from None\n"
        "class A:\n"
        "    def __getattr__(self, name):\n"
        "        raise AttributeError(name)\n"
        "    def g(self):\n"
        "        raise AttributeError('not here')\n"
        "    def h(self):\n"
        "        raise NotImplementedError\n"
        "def ok():\n"
        "    try:\n"
        "        pass\n"
        "    except OSError as e:\n"
        "        raise\n"
        "    raise MyError('fine')\n"
        "raise RuntimeError\n"
    )
    assert builtin_raises(source) == [(4, "ValueError", "f"), (5, "KeyError", "f"), (10, "AttributeError", "g"), (19, "RuntimeError", "<module>")]
