"""argparse types and checks shared by the command lines of childopt."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


def number(kind, low: float, *, low_open: bool = True, high: float = math.inf):
    """An argparse type: a finite ``kind`` in (low, high] (or [low, high]; open at an infinite ``high``), with
    a message naming the range: inf and nan are never a learning rate, a size or a share."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not ((value > low) if low_open else (value >= low)) or value > high or not math.isfinite(value):
            interval = f"{'(' if low_open else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
            raise argparse.ArgumentTypeError(f"expected a value in {interval}, got {text}")
        return value
    return parse


# Formats matplotlib lists but writes only through an outside program (pgf: a LaTeX install).
_PLOT_FORMATS_NEEDING_PROGRAMS = frozenset({"pgf"})


def output_path(value: PathLike) -> Path:
    """An output path as given on the command line, ``~`` expanded (argparse leaves ``--json=~/x`` as is)."""
    return Path(value).expanduser()


def _why_not_writable(path: Path) -> Optional[str]:
    """Why ``path`` cannot be written as an output file, or None: an existing file must be
    writable; a new one needs its nearest existing ancestor to be a folder that takes new entries
    (its missing folders are made), with no broken symbolic link (the file itself included) and
    no name too long for the file system on the way."""
    if "\0" in str(path):
        return "it holds a NUL character"
    try:
        if path.is_dir():
            return "it is a folder; give the path of a file in it"
        if path.exists():
            return None if os.access(path, os.W_OK) else "the file cannot be written"
        folder = path.absolute()
        while not folder.exists():
            if folder.is_symlink():  # dangling, or a loop
                return f"{str(folder)!r} is a broken symbolic link"
            folder = folder.parent
        if not folder.is_dir():
            return "its folder cannot be made or written"
        if why := _why_no_new_file(folder):
            return f"its folder cannot be made or written ({why})"
        longest = os.pathconf(folder, "PC_NAME_MAX")
        if any(len(os.fsencode(part)) > longest for part in path.absolute().relative_to(folder).parts):
            return f"a name in it is longer than {longest} bytes"
    except (OSError, RuntimeError) as exc:  # a name too long, a folder we may not search, a symlink loop
        return str(exc)
    return None


def _why_no_new_file(folder: Path) -> Optional[str]:
    """Why no file can be made in ``folder``, or None, by making (and removing) one: permission bits
    do not tell for root, a read-only mount or /proc."""
    try:
        handle, name = tempfile.mkstemp(dir=folder, prefix=".childopt-probe-")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(handle)
    os.unlink(name)
    return None


def _same_file(a: Path, b: Path) -> bool:
    """Whether two output paths name one file: the same resolved path, or (for existing files) one
    file under two names (hard links, a case-insensitive file system)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):
        return False


def _inside(a: Path, b: Path) -> bool:
    """Whether output path ``a`` lies under ``b`` (which, as an output, is a file: ``a`` cannot be written)."""
    try:
        return b.resolve() in a.resolve().parents
    except (OSError, RuntimeError):
        return False


def check_output_files(parser: argparse.ArgumentParser, outputs: dict[str, Optional[str]], plots=()) -> None:
    """Refuse, before anything runs, output paths a command could only fail to write at its end
    (after minutes of measuring): an empty path, a folder given as the file, a file or folder that
    cannot be written or made, two options naming one file or one the other's folder; for the
    options in ``plots``, a missing matplotlib or a suffix that is not a format it writes by itself.
    ``outputs``: option -> the path given (None: not given)."""
    given = {option: output_path(value) for option, value in outputs.items() if value is not None}
    checked: dict = {}
    for option, path in given.items():
        if not str(outputs[option]).strip():
            parser.error(f"{option}: the path is empty")
        if str(outputs[option]).endswith(("/", os.sep)):  # pathlib drops the slash: it would write a file
            parser.error(f"{option}: {outputs[option]!r} ends in a slash, so names a folder; give the path of a file")
        why = _why_not_writable(path)
        if why:
            parser.error(f"{option}: cannot write {str(path)!r}: {why}")
        other = next((name for name, seen in checked.items() if _same_file(path, seen)), None)
        if other:
            parser.error(f"{option}: {str(path)!r} is also the file of {other}; give each output its own path")
        other = next((name for name, seen in checked.items() if _inside(path, seen) or _inside(seen, path)), None)
        if other:
            parser.error(f"{option}: {str(path)!r} and {other}'s {str(checked[other])!r}: one would be the other's "
                         "folder, but both are files; give each output its own path")
        checked[option] = path
    for option in (option for option in plots if option in given):
        try:
            why = why_not_a_figure(given[option])
        except ImportError:
            parser.error(f"{option} needs matplotlib: pip install matplotlib")
        if why:
            parser.error(f"{option}: {why}")


def why_not_a_figure(path: Path) -> Optional[str]:
    """Why matplotlib cannot write a figure to ``path`` by itself (its suffix), or None; ImportError
    without matplotlib."""
    from matplotlib.figure import Figure

    formats = set(Figure().canvas.get_supported_filetypes()) - _PLOT_FORMATS_NEEDING_PROGRAMS
    if path.suffix.lstrip(".").lower() in formats:
        return None
    return f"{str(path)!r} does not end in a format matplotlib writes ({', '.join('.' + f for f in sorted(formats))})"


def writable_path(value: PathLike) -> Path:
    """The output path ``value`` (``~`` expanded) with its folder made if missing, for an output
    :func:`check_output_files` passed."""
    path = output_path(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def replacing(value: PathLike) -> Iterator[Path]:
    """A temporary path beside the output ``value`` (its folder made; the same suffix, so matplotlib
    picks the format) that replaces the output when the block ends without an error: a run stopped
    while writing leaves the earlier file whole instead of a truncated one.  An output that is a
    symbolic link has the file it names replaced (the link stays); the new file keeps the earlier
    one's permissions, or gets those a plain ``open`` would give (mkstemp's are owner-only), but not
    its owner, hard links or extended attributes.  Written in place instead: what is not a regular
    file (``/dev/null``, ``/dev/stdout``, a FIFO) and a file in a folder that takes no new entries.
    A run killed by a signal Python does not handle (SIGTERM, SIGKILL) can leave a hidden
    ``.childopt-*`` file beside the output."""
    path = writable_path(value)
    special = path.exists() and (not path.is_file() or path.absolute().parts[1:2] in (("dev",), ("proc",)))
    if path.is_symlink() and not special:
        path = path.resolve()
    if special or (path.exists() and not os.access(path.parent, os.W_OK | os.X_OK)):
        yield path
        return
    # a short name: the output's own may be near the file system's limit
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=".childopt-", suffix=path.suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        if path.exists():
            mode = path.stat().st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_output(value: PathLike, text: str) -> None:
    """Write ``text`` to the output file ``value`` through :func:`replacing`."""
    with replacing(value) as temporary:
        temporary.write_text(text)


def save_figure(fig, value: PathLike, dpi: int) -> None:
    """A matplotlib figure into the output file ``value`` through :func:`replacing` (the format from its suffix)."""
    with replacing(value) as image:
        fig.savefig(image, dpi=dpi)
