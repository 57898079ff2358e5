"""Every module of the project imports on its own, first, in an interpreter that holds no other.

An import cycle or a module that works only because another one happened to be imported
before it shows up only in the process that imports it first: the CLI, a worker, Alembic's
environment, a test run alone. Each module is imported in a child forked from a fresh
interpreter that has imported third-party libraries (so that torch is loaded once, not
ninety times) but nothing of `agent` or `coordinator`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "coordinator")

_CHILD = r"""
import json, os, sys, traceback
for lib in ("torch", "monai", "numpy", "fastapi", "sqlalchemy", "pydantic", "httpx", "typer", "pydicom",
            "nibabel", "safetensors", "cryptography", "matplotlib", "uvicorn", "alembic", "yaml"):
    __import__(lib)
assert not any(m == p or m.startswith(p + ".") for m in sys.modules for p in ("agent", "coordinator"))
failures = {}
for name in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            __import__(name)
            msg = b""
        except BaseException:
            msg = traceback.format_exc().encode()
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode()
    if text or status != 0:
        failures[name] = text or f"child ended with status {status}"
print(json.dumps(failures))
"""


def project_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            # Alembic revisions and env are run by Alembic, not imported as modules.
            if "migrations" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts[-1] == "__main__":
                continue
            names.append(".".join(parts))
    return names


def test_every_module_is_found() -> None:
    names = project_modules()
    assert "agent.jobs.worker" in names and "coordinator.strategies.fedavg" in names
    assert len(names) > 60


def test_every_module_imports_on_its_own() -> None:
    names = project_modules()
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(names)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert failures == {}, "\n\n".join(f"{name}:\n{text}" for name, text in failures.items())


def test_the_cli_starts_without_monai_or_matplotlib() -> None:
    """`fedsite version`, `tokens`, `audit verify` and the rest load the command tree first; MONAI
    (which brings matplotlib, which wants a writable config folder) only where a command trains,
    evaluates or accounts for privacy. In the image's read-only container an eager import made
    every `fedsite` command fail."""
    probe = (
        "import sys, agent.cli; "
        "print(sorted(m for m in ('monai', 'matplotlib', 'opacus') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
