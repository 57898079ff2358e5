"""Can a given uid read a folder tree? Checked as that uid, with the exact fix when it cannot.

The agent runs as uid 10001 in its container, but the hospital's data usually belongs to
someone else. A tree the agent cannot read must be named as such (which uid, which folder, what
command fixes it) instead of surfacing as an empty dataset or a PermissionError traceback. The
config check, the catalog scan and `fedsite doctor` all word it here, so that they agree.

Checking as another uid (root running the doctor for the agent's uid) happens in a forked child
that drops to that uid and gid before touching anything: the kernel's answer, ACLs included,
rather than a guess from mode bits. The parent keeps its own identity.
"""

from __future__ import annotations

import errno
import json
import os
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Files opened per tree and folders listed: enough to find a wrong mode in a sample of subjects
# without reading a whole archive.
DEFAULT_SAMPLE_FILES = 20
MAX_FOLDERS = 200
# Files checked per folder, so that the sample spreads over subjects instead of one folder.
_FILES_PER_FOLDER = 2


def fix_command(path: Path | str, uid: int, *, recursive: bool = True) -> str:
    """The commands that let UID read PATH (run on the host, on the folder that is mounted there).

    Both forms are given: `chmod` opens the tree to every user, `setfacl` to UID alone (Debian:
    `apt-get install acl`; `-d` makes files added later readable too)."""
    if not recursive:
        return f"chmod o+x {path}  (or: setfacl -m u:{uid}:x {path})"
    return (
        f"chmod -R o+rX {path}  (or, for uid {uid} only, with the acl package: "
        f"setfacl -R -m u:{uid}:rX {path} && setfacl -R -d -m u:{uid}:rX {path})"
    )


@dataclass
class TreeAccess:
    """What one uid could do with a tree: only local paths here, for the local admin."""

    root: str
    uid: int
    # False when the check could not run as UID (not root, and UID is not ours).
    checked: bool = True
    exists: bool = True
    is_dir: bool = True
    # The first folder above the root that UID cannot enter, if any.
    blocked_at: str | None = None
    root_listable: bool = True
    empty: bool = False
    folders_checked: int = 0
    files_checked: int = 0
    unreadable_folders: list[str] = field(default_factory=list)
    unreadable_files: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        """UID can enter and list the root and read every file and folder sampled."""
        return (
            self.checked
            and self.exists
            and self.is_dir
            and self.blocked_at is None
            and self.root_listable
            and not self.unreadable_folders
            and not self.unreadable_files
        )

    @property
    def unreadable(self) -> bool:
        """The tree exists but UID is refused somewhere in it (as opposed to missing or empty)."""
        return self.checked and self.exists and not self.ok and self.is_dir

    def reason(self) -> str | None:
        """The problem without any path (fit for the API), or None."""
        if not self.checked:
            return None
        if self.blocked_at is not None or not self.root_listable:
            return f"dataset folder unreadable by uid {self.uid}"
        if not self.exists:
            return "dataset folder does not exist"
        if not self.is_dir:
            return "dataset root is not a folder"
        if self.unreadable_folders or self.unreadable_files:
            return f"files unreadable by uid {self.uid}"
        if self.empty:
            return "dataset folder is empty"
        return None

    def message(self) -> str | None:
        """One line for the local admin: what, where, which uid and the fix; None when fine."""
        if not self.checked:
            return self.note or None
        if self.blocked_at is not None:
            return (
                f"{self.root}: uid {self.uid} cannot enter {self.blocked_at} (permission denied); "
                f"fix: {fix_command(self.blocked_at, self.uid, recursive=False)}"
            )
        if not self.exists:
            return f"{self.root}: folder does not exist (a mistyped path or a share that is not mounted?)"
        if not self.is_dir:
            return f"{self.root}: not a folder"
        if not self.root_listable:
            return (
                f"{self.root}: folder unreadable by uid {self.uid} (permission denied); "
                f"fix: {fix_command(self.root, self.uid)}"
            )
        bad = self.unreadable_folders + self.unreadable_files
        if bad:
            return (
                f"{self.root}: {len(self.unreadable_folders)} folder(s) and {len(self.unreadable_files)} "
                f"file(s) of {self.folders_checked + self.files_checked} checked unreadable by uid "
                f"{self.uid} (first: {bad[0]}); fix: {fix_command(self.root, self.uid)}"
            )
        if self.empty:
            return f"{self.root}: folder is empty (a mistyped host path makes docker create an empty one)"
        return None


def _denied(exc: OSError) -> bool:
    return exc.errno in (errno.EACCES, errno.EPERM)


def _probe(root: Path, uid: int, sample: int, max_folders: int = MAX_FOLDERS) -> TreeAccess:
    """The check itself, as whoever this process is."""
    out = TreeAccess(root=str(root), uid=uid)
    try:
        st_is_dir = root.is_dir()
        exists = st_is_dir or root.exists()
    except OSError as exc:
        if not _denied(exc):
            raise
        # A folder above the root cannot be entered: name the first one.
        for parent in reversed(root.parents):
            if not os.access(parent, os.X_OK):
                out.blocked_at = str(parent)
                break
        else:
            out.blocked_at = str(root.parent)
        return out
    out.exists, out.is_dir = exists, st_is_dir
    if not st_is_dir:
        return out
    queue: deque[Path] = deque([root])
    while queue and out.folders_checked < max_folders:
        folder = queue.popleft()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            if not _denied(exc):
                raise
            if folder == root:
                out.root_listable = False
                return out
            out.unreadable_folders.append(str(folder))
            continue
        out.folders_checked += 1
        if folder == root and not any(not e.name.startswith(".") for e in entries):
            out.empty = True
            return out
        files_here = 0
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=True):
                queue.append(Path(entry.path))
            elif files_here < _FILES_PER_FOLDER and out.files_checked < sample:
                files_here += 1
                out.files_checked += 1
                try:
                    with open(entry.path, "rb") as fh:
                        fh.read(1)
                except OSError as exc:
                    if not _denied(exc):
                        raise
                    out.unreadable_files.append(entry.path)
    return out


def _as_uid(uid: int, probe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """PROBE's answer as computed by a child forked from this (root) process that dropped to UID
    (and the gid of the same number, as in the image, with no supplementary groups); on failure
    a dict with an "error" key."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            payload = json.dumps(probe()).encode()
        except BaseException as exc:  # everything goes back to the parent as a note
            payload = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
        with os.fdopen(w, "wb") as fh:
            fh.write(payload)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data: dict[str, Any] = json.loads(fh.read() or b'{"error": "no answer"}')
    os.waitpid(pid, 0)
    return data


def check_tree(
    root: Path, *, uid: int | None = None, sample: int = DEFAULT_SAMPLE_FILES, max_folders: int = MAX_FOLDERS
) -> TreeAccess:
    """Check ROOT as UID (default: this process's effective uid), listing at most MAX_FOLDERS
    folders (1: the root alone) and opening at most SAMPLE files.

    As root for another uid the check runs in a forked child that drops to that uid. As anyone
    else for another uid it cannot be made: the result says so (`checked` False)."""
    me = os.geteuid()
    if uid is None or uid == me:
        return _probe(root, me, sample, max_folders)
    if me != 0:
        return TreeAccess(
            root=str(root),
            uid=uid,
            checked=False,
            note=f"{root}: not checked as uid {uid}: only root can check as another user (this is uid {me})",
        )
    data = _as_uid(uid, lambda: asdict(_probe(root, uid, sample, max_folders)))
    if "error" in data:
        return TreeAccess(
            root=str(root), uid=uid, checked=False, note=f"{root}: check as uid {uid} failed: {data['error']}"
        )
    return TreeAccess(**data)


def _read_one(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        return {"readable": False, "why": exc.strerror or type(exc).__name__}
    return {"readable": True, "why": ""}


def file_unreadable(path: Path, *, uid: int | None = None) -> str | None:
    """Why UID cannot read the file PATH (with the fix), or None when it can or cannot be checked."""
    me = os.geteuid()
    if uid is None or uid == me:
        data = _read_one(path)
        uid = me
    elif me != 0:
        return None
    else:
        data = _as_uid(uid, lambda: _read_one(path))
    if data.get("readable", True):
        return None
    return (
        f"{path}: unreadable by uid {uid} ({data['why']}); fix: chown {uid} {path} && chmod 600 {path} "
        f"(or: setfacl -m u:{uid}:r {path})"
    )
