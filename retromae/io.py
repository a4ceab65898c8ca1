"""Writes that are never half-done: write beside the target under a temporary name, then rename.

`tempfile.mkstemp` / `mkdtemp` create files 0600 and folders 0700 whatever the umask; what they produce here
becomes a user's output (a model folder on a shared cluster, a results file), so it is given the modes that
`open()` / `mkdir()` would have given it under the process's umask.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read from /proc where possible: setting it to read it back is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path, directory: bool = False) -> None:
    """Give `path` the mode a plain open() / mkdir() would have: 0666 / 0777 less the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def share_like_umask(folder: str | Path) -> None:
    """Give a finished output folder (and what is in it) the modes the umask allows: some writers (transformers'
    safetensors files among them) create 0600 files through temporary files, and a model on a shared cluster
    must be readable by the group."""
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, (0o777 if os.stat(path).st_mode & 0o100 else 0o666) & ~mask)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def temporary_sibling(path: str | Path) -> Path:
    """A fresh, empty folder beside `path` (`.NAME.XXXX.tmp`), with the umask's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    follow_umask(tmp, directory=True)
    return tmp


@contextlib.contextmanager
def atomic_directory(path: str | Path):
    """Yield a fresh temporary directory beside `path`; on success it replaces `path` in one rename.

    If anything fails inside the block, the temporary directory is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    share_like_umask(tmp)
    replace_directory(tmp, path)


def replace_directory(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing an existing `dst` without a moment where neither exists whole."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def stale_temporaries(folder: str | Path) -> list[Path]:
    """What a killed run leaves in `folder`: `.NAME.XXXX.tmp` files and folders, `.NAME.old-PID` folders."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name.startswith(".") and (p.name.endswith(".tmp") or ".old-" in p.name)]


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
