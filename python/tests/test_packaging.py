"""The package a Python user gets: one version everywhere, and an sdist that builds offline
into a wheel that installs and runs in a fresh virtual environment.

The build test is slow-ish (about a minute on two cores: it compiles qimg's own crates from
the unpacked sdist, reusing the dependencies the main build compiled into ``target/``), so it
carries the ``slow`` marker; it still runs in CI. It needs cargo (which building qimg needs
anyway), maturin and twine (the ``test`` extra): a missing one fails it, with what to install.
"""

from __future__ import annotations

import email.parser
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from email.message import Message
from pathlib import Path

import pytest

import qimg

ROOT = Path(__file__).resolve().parents[2]

#: A command of the build may take this long before the test fails instead of hanging.
BUILD_TIMEOUT_S = 900


def _section(text: str, header: str) -> str:
    """The body of one ``[header]`` table of a TOML file (up to the next table)."""
    match = re.search(rf"^\[{re.escape(header)}\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert match is not None, f"no [{header}] table"
    return match[1]


def _cargo_version() -> str:
    body = _section((ROOT / "Cargo.toml").read_text(encoding="utf-8"), "workspace.package")
    match = re.search(r'^version\s*=\s*"([^"]+)"', body, re.M)
    assert match is not None, "Cargo.toml's [workspace.package] has no version"
    return match[1]


def _changelog_newest() -> str:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    match = re.search(r"^## \[([^\]]+)\]", text, re.M)
    assert match is not None, "CHANGELOG.md has no '## [version]' entry"
    return match[1]


def _readme_links() -> list[str]:
    """The repository files README.md links to (relative links, anchors dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = (m[1].split("#")[0] for m in re.finditer(r"\]\(([^)\s]+)\)", text))
    return sorted({link for link in links if link and "://" not in link})


def test_one_version_everywhere() -> None:
    """Cargo's workspace version is the only one written down: pyproject takes it from Cargo
    (dynamic), the extension is built with it, and CHANGELOG's newest entry names it."""
    version = _cargo_version()
    project = _section((ROOT / "pyproject.toml").read_text(encoding="utf-8"), "project")
    assert re.search(r'^dynamic\s*=\s*\[[^\]]*"version"', project, re.M), (
        "pyproject.toml must take the version from Cargo: dynamic = ['version']"
    )
    assert not re.search(r"^version\s*=", project, re.M), "pyproject.toml states a version"
    for member in ("qimg-core", "qimg-py"):
        manifest = (ROOT / "rust" / member / "Cargo.toml").read_text(encoding="utf-8")
        assert re.search(r"^version\.workspace\s*=\s*true", manifest, re.M), member
    assert qimg.__version__ == version
    assert _changelog_newest() == version


def test_readme_links_exist() -> None:
    missing = [link for link in _readme_links() if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def _require(what: str, present: bool) -> None:
    if not present:
        pytest.fail(
            f"{what} is missing: the packaging test needs it "
            "(pip install -e '.[test]' brings maturin and twine; scripts/test installs all)"
        )


def _run(argv: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    """Runs one build step; fails the test with its output unless it exits 0."""
    started = time.monotonic()
    proc = subprocess.run(
        [os.fspath(a) for a in argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=BUILD_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    took = time.monotonic() - started
    print(f"{took:6.1f} s  {' '.join(os.fspath(a) for a in argv)}")
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def _metadata(raw: bytes) -> Message:
    return email.parser.BytesParser().parsebytes(raw)


def _build_env() -> dict[str, str]:
    """Offline, with the test's Python tools first on PATH, and cargo's target directory the
    main build's, so the dependencies it compiled are reused (only qimg's crates compile)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["CARGO_NET_OFFLINE"] = "true"
    env["PIP_NO_INDEX"] = "1"
    env.setdefault("CARGO_TARGET_DIR", str(ROOT / "target"))
    env.pop("PIP_FIND_LINKS", None)
    return env


def _unpack(sdist: Path, into: Path) -> Path:
    """Unpacks the sdist and dates its files now. maturin stamps sdist members with a fixed
    old time, and cargo would then take the main build's artifacts in the shared target
    directory as up to date: the sdist's own sources would never be compiled."""
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)  # our own sdist, just built
    (tree,) = into.iterdir()
    for path in tree.rglob("*"):
        path.touch()
    return tree


@pytest.mark.slow
def test_sdist_builds_offline_into_a_wheel_that_runs_in_a_fresh_venv(tmp_path: Path) -> None:
    _require("cargo", shutil.which("cargo") is not None)
    for module in ("maturin", "twine", "pip"):
        _require(f"the Python module {module}", importlib.util.find_spec(module) is not None)
    env = _build_env()
    version = _cargo_version()
    py = sys.executable

    # 1. The sdist, from the source tree.
    sdist_dir = tmp_path / "sdist"
    _run([py, "-m", "maturin", "sdist", "--out", sdist_dir], ROOT, env)
    (sdist,) = sdist_dir.iterdir()
    assert sdist.name == f"qimg-{version}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = set(tar.getnames())
        pkg_info = tar.extractfile(f"qimg-{version}/PKG-INFO")
        assert pkg_info is not None
        sdist_meta = _metadata(pkg_info.read())
        license_member = tar.extractfile(f"qimg-{version}/LICENSE")
        assert license_member is not None, "LICENSE is not in the sdist"
        assert license_member.read() == (ROOT / "LICENSE").read_bytes()
    missing = [link for link in _readme_links() if f"qimg-{version}/{link}" not in names]
    assert not missing, f"the sdist lacks files README.md links to: {missing}"
    assert sdist_meta["Version"] == version
    assert sdist_meta["License-Expression"] == "MIT"
    assert sdist_meta.get_all("License-File") == ["LICENSE"]

    # 2. A wheel from the unpacked sdist alone: no network, no build isolation.
    tree = _unpack(sdist, tmp_path / "unpacked")
    wheel_dir = tmp_path / "wheel"
    pip_wheel: list[str | Path] = [py, "-m", "pip", "wheel", "-q", "--no-index", "--no-deps"]
    pip_wheel += ["--no-build-isolation", "--no-cache-dir", "-w", wheel_dir, tree]
    _run(pip_wheel, tmp_path, env)
    (wheel,) = wheel_dir.iterdir()
    assert wheel.name.startswith(f"qimg-{version}-cp310-abi3-"), wheel.name
    with zipfile.ZipFile(wheel) as whl:
        dist_info = f"qimg-{version}.dist-info"
        assert whl.read(f"{dist_info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        wheel_meta = _metadata(whl.read(f"{dist_info}/METADATA"))
        assert "qimg/py.typed" in whl.namelist()
    assert wheel_meta["Version"] == version
    assert wheel_meta["License-Expression"] == "MIT"

    # 3. Both pass twine's checks, as PyPI's upload would.
    _run([py, "-m", "twine", "check", "--strict", sdist, wheel], tmp_path, env)

    # 4. The wheel installs into a fresh venv and runs from there, not from the tree.
    venv = tmp_path / "venv"
    _run([py, "-m", "venv", venv], tmp_path, env)
    bin_dir = venv / "bin"
    pip_install: list[str | Path] = [bin_dir / "python", "-m", "pip", "install", "-q"]
    pip_install += ["--no-index", "--no-deps"]
    _run([*pip_install, wheel], tmp_path, env)
    work = tmp_path / "work"
    work.mkdir()
    where = _run([bin_dir / "python", "-c", "import qimg; print(qimg.__file__)"], work, env)
    assert Path(where.strip()).is_relative_to(venv), where
    assert _run([bin_dir / "qimg", "--version"], work, env).strip() == f"qimg {version}"
    _run([bin_dir / "qimg", "create", "-f", "qcow2", "x.qcow2", "1M"], work, env)
    info = _run([bin_dir / "qimg", "info", "x.qcow2"], work, env)
    assert "file format: qcow2" in info
    assert "virtual size: 1 MiB (1048576 bytes)" in info
