"""One error root: every exception of the project derives from `FedsiteError`, has a name of its own,
and appears in the tree that `agent.errors` writes out in its docstring.

The exceptions are found the way Python knows them: every module of `agent` and `coordinator` is
imported, then every subclass of `BaseException` defined in one of them is collected. A class added
anywhere without the root, under a name already taken (by us or by a dependency), or left out of the
docstring's tree fails here, so the tree cannot go stale.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import pkgutil
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent
import agent.errors
import coordinator
from agent.errors import FedsiteError

# Names an exception of ours must not take: a reader seeing `except DatabaseError` next to
# SQLAlchemy code should not have to check which one it is. The libraries whose errors the
# project's code meets, and the modules where they keep them.
DEPENDENCY_MODULES = (
    "builtins",
    "sqlalchemy",
    "sqlalchemy.exc",
    "sqlalchemy.orm.exc",
    "alembic.util.exc",
    "psycopg",
    "psycopg.errors",
    "pydantic",
    "pydantic.errors",
    "pydantic_core",
    "httpx",
    "safetensors",
    "fastapi",
    "fastapi.exceptions",
    "starlette.exceptions",
    "typer",
    "click.exceptions",
    "yaml",
    "pydicom.errors",
    "nibabel",
    "cryptography.exceptions",
    "torch",
    "monai",
)
_TREE_LINE = re.compile(r"^(?P<lead>[ │]*)(?:[├└]── )?(?P<name>\w+)(?: \[(?P<builtins>[\w, ]+)\])?$")


def project_modules() -> Iterator[str]:
    """Every importable module of the two packages (Alembic's scripts and `__main__` excepted)."""
    for package in (agent, coordinator):
        yield package.__name__
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".migrations" in info.name or info.name.endswith(".__main__"):
                continue
            yield info.name


def project_exceptions() -> list[type[BaseException]]:
    """Every exception class defined in a module of the project, once all of them are imported."""
    for name in project_modules():
        importlib.import_module(name)
    found: list[type[BaseException]] = []
    todo: list[type[BaseException]] = [BaseException]
    seen: set[type[BaseException]] = set()
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub in seen:
                continue
            seen.add(sub)
            todo.append(sub)
            if sub.__module__.split(".")[0] in ("agent", "coordinator"):
                found.append(sub)
    return sorted(found, key=lambda c: (c.__module__, c.__qualname__))


def docstring_tree() -> list[tuple[str, str | None, tuple[str, ...]]]:
    """(name, parent name, builtin second bases) for each line of the tree in `agent.errors`."""
    lines = (agent.errors.__doc__ or "").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == FedsiteError.__name__)
    indent = len(lines[start]) - len(lines[start].lstrip())
    nodes: list[tuple[str, str | None, tuple[str, ...]]] = []
    parents: list[str] = []
    for line in lines[start:]:
        if nodes and "── " not in line:
            break
        match = _TREE_LINE.match(line[indent:])
        assert match, f"agent.errors docstring: cannot read tree line {line!r}"
        depth = 0 if not nodes else len(match["lead"]) // 4 + 1
        del parents[depth:]
        name = match["name"]
        extra = tuple(b.strip() for b in match["builtins"].split(",")) if match["builtins"] else ()
        nodes.append((name, parents[-1] if parents else None, extra))
        parents.append(name)
    return nodes


@pytest.fixture(scope="module")
def exceptions() -> list[type[BaseException]]:
    found = project_exceptions()
    assert len(found) > 40, [c.__name__ for c in found]
    return found


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_every_exception_derives_from_the_root(exceptions: list[type[BaseException]]) -> None:
    outside = [_where(c) for c in exceptions if not issubclass(c, FedsiteError)]
    assert not outside, f"not under agent.errors.FedsiteError: {outside}"


def test_exception_names_are_unique(exceptions: list[type[BaseException]]) -> None:
    counts = Counter(c.__name__ for c in exceptions)
    twice = {n: [_where(c) for c in exceptions if c.__name__ == n] for n, k in counts.items() if k > 1}
    assert not twice, f"exception names used more than once: {twice}"


def test_no_exception_takes_a_dependency_name(exceptions: list[type[BaseException]]) -> None:
    taken: dict[str, str] = {}
    for module_name in DEPENDENCY_MODULES:
        module = builtins if module_name == "builtins" else importlib.import_module(module_name)
        for name in dir(module):
            if not name.startswith("_"):
                taken.setdefault(name, module_name)
    clashes = {_where(c): taken[c.__name__] for c in exceptions if c.__name__ in taken}
    assert not clashes, f"exception names that a dependency exports too: {clashes}"


def test_the_docstring_tree_is_the_hierarchy(exceptions: list[type[BaseException]]) -> None:
    by_name = {c.__name__: c for c in exceptions}
    tree = docstring_tree()
    in_tree = [name for name, _, _ in tree]
    assert len(in_tree) == len(set(in_tree)), "a class appears twice in the tree"
    public = {n for n in by_name if not n.startswith("_")}
    assert set(in_tree) == public, (
        f"missing from the tree: {sorted(public - set(in_tree))}; "
        f"in the tree but not a class: {sorted(set(in_tree) - public)}"
    )
    for name, parent, extra in tree:
        cls = by_name[name]
        bases = cls.__bases__
        if parent is None:
            assert cls is FedsiteError and bases == (Exception,)
            continue
        assert bases[0].__name__ == parent, (
            f"{_where(cls)} derives from {bases[0].__name__}, the tree says {parent}"
        )
        builtin_bases = tuple(b.__name__ for b in bases[1:])
        assert builtin_bases == extra, f"{_where(cls)}: second bases {builtin_bases}, the tree says {extra}"
        assert all(getattr(builtins, b, None) is not None for b in builtin_bases)


def test_private_exceptions_derive_from_the_root_and_are_named(exceptions: list[type[BaseException]]) -> None:
    """Control-flow exceptions that never leave their module: directly under the root, and listed."""
    doc = agent.errors.__doc__ or ""
    for cls in exceptions:
        if cls.__name__.startswith("_"):
            assert cls.__bases__ == (FedsiteError,), _where(cls)
            assert f"`{cls.__module__}.{cls.__name__}`" in doc or f"`{cls.__name__}`" in doc, _where(cls)


def test_every_exception_says_why_it_exists(exceptions: list[type[BaseException]]) -> None:
    missing = [_where(c) for c in exceptions if not (c.__dict__.get("__doc__") or "").strip()]
    assert not missing, f"exceptions without a docstring: {missing}"


def test_the_error_module_imports_nothing_of_the_project() -> None:
    """Every layer raises from `agent.errors`, `agent.db` included: it must sit below all of them."""
    tree = ast.parse(Path(agent.errors.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    ours = [m for m in imported if m.split(".")[0] in ("agent", "coordinator")]
    assert not ours, f"agent.errors imports {ours}"
