"""Test images made with QEMU's own tools, for the tests that compare qimg with QEMU.

The images come from ``qemu-img`` and ``qemu-io`` (raw files may also get their bytes from
Python), never from qimg: qimg's output is what these tests check, so it must not also make
their inputs.

A ``Corpus`` is one directory and a table of recipes (name -> how to make the image). An image
is made the first time a test asks for it and then reused for as long as the corpus lives (its
fixture's scope): a test module asks for a few images out of many, and under xdist each worker
then makes only what its own tests read. Tests must only read corpus images; a test that writes
copies one first.

Each test module keeps its own table (what its tests need) and builds it from ``created``,
``compressed`` and, where a recipe fits neither, a function of its own. File names may have
directories (made as needed), so that a module can group images, e.g. a backing chain whose
files name each other by relative names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from conftest import RunCommand


@dataclass(frozen=True)
class Image:
    """A corpus image: its path, its format, and its backing file if any."""

    path: Path
    fmt: str
    backing: Path | None = None
    backing_fmt: str | None = None


#: How to make one image of a corpus (it may ask the corpus for the images it is made from).
Recipe: TypeAlias = Callable[["Corpus"], Image]


def commands(*lines: str) -> list[str]:
    """qemu-io's (and ``qimg io``'s) arguments that run these command lines in order."""
    argv: list[str] = []
    for line in lines:
        argv += ["-c", line]
    return argv


class Corpus:
    """Images in *root*, made by *recipes* when first asked for: ``corpus["name"]``."""

    def __init__(
        self,
        root: Path,
        run_qemu_img: RunCommand,
        run_qemu_io: RunCommand,
        recipes: Mapping[str, Recipe],
    ) -> None:
        self.root = root
        self._run_qemu_img = run_qemu_img
        self._run_qemu_io = run_qemu_io
        self._recipes = recipes
        self._made: dict[str, Image] = {}

    def __getitem__(self, name: str) -> Image:
        if name not in self._made:
            self._made[name] = self._recipes[name](self)
        return self._made[name]

    def path(self, file: str) -> Path:
        """Where *file* goes in the corpus; its directory is made if need be."""
        path = self.root / file
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def qemu_img(self, *args: str | Path | int) -> str:
        """Runs qemu-img and returns its stdout (a recipe may need what it says about an
        image); a failure fails the test that needed the image."""
        proc = self._run_qemu_img(*args)
        assert proc.returncode == 0, f"corpus: qemu-img {args} failed: {proc.stderr}"
        return proc.stdout

    def qemu_io(self, fmt: str, path: Path, *lines: str, status: int = 0) -> None:
        """Runs qemu-io's command *lines* on *path*. Any error message fails it, whatever the
        exit status: an image missing a write would give its tests a wrong source silently.
        *status* is the exit status it must end with: -9 for lines that end in ``sigraise 9``,
        which leave the image as a crash would (a dirty bit set, metadata never written)."""
        proc = self._run_qemu_io("-f", fmt, *commands(*lines), path)
        out = proc.stdout + proc.stderr
        assert proc.returncode == status and "error" not in out.lower(), (
            f"corpus: qemu-io {lines} on {path} failed (exit {proc.returncode}): {out}"
        )

    def create(
        self,
        file: str,
        fmt: str,
        size: int | str | None,
        *writes: str,
        options: str = "",
        backing: Image | None = None,
        relative_backing: bool = False,
    ) -> Image:
        """``qemu-img create`` (*size* None: the backing file's), then qemu-io's *writes*.

        *relative_backing*: the header names the backing file by its path relative to the new
        image's directory (where QEMU resolves a relative name), not by its absolute path: for
        tests of relative backing names, and headers that do not hold the corpus root.
        """
        path = self.path(file)
        argv: list[str | Path | int] = ["create", "-q", "-f", fmt]
        if backing is not None:
            name = backing.path
            if relative_backing:
                name = Path(os.path.relpath(backing.path, path.parent))
            argv += ["-b", name, "-F", backing.fmt]
        if options:
            argv += ["-o", options]
        argv.append(path)
        if size is not None:
            argv.append(size)
        self.qemu_img(*argv)
        if writes:
            self.qemu_io(fmt, path, *writes)
        return Image(
            path,
            fmt,
            None if backing is None else backing.path,
            None if backing is None else backing.fmt,
        )

    def compress(self, file: str, source: Image, *writes: str, options: str = "") -> Image:
        """``qemu-img convert -c`` of *source* into a new qcow2 image, then qemu-io's *writes*
        (a write into a compressed cluster decompresses it; ``write -c`` adds more)."""
        path = self.path(file)
        argv: list[str | Path | int] = ["convert", "-c", "-f", source.fmt, "-O", "qcow2"]
        if options:
            argv += ["-o", options]
        self.qemu_img(*argv, source.path, path)
        if writes:
            self.qemu_io("qcow2", path, *writes)
        return Image(path, "qcow2")


def created(
    file: str,
    fmt: str,
    size: int | str | None,
    *writes: str,
    options: str = "",
    backing: str | None = None,
    relative_backing: bool = False,
) -> Recipe:
    """A recipe for ``Corpus.create``; *backing* names another image of the same corpus."""

    def make(corpus: Corpus) -> Image:
        base = None if backing is None else corpus[backing]
        return corpus.create(
            file,
            fmt,
            size,
            *writes,
            options=options,
            backing=base,
            relative_backing=relative_backing,
        )

    return make


def compressed(file: str, source: str, *writes: str, options: str = "") -> Recipe:
    """A recipe for ``Corpus.compress``; *source* names another image of the same corpus."""

    def make(corpus: Corpus) -> Image:
        return corpus.compress(file, corpus[source], *writes, options=options)

    return make
