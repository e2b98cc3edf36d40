"""Command-line habits: help that shows only what works, shell completion and the man
page generated from the parser, -v/QIMG_LOG diagnostics, and a start-up that imports
only what the command runs."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RunCommand, assert_ok
from qimg import __version__, cli
from qimg.commands._parser import (
    commands_of,
    example_lines,
    positionals,
    visible_options,
)
from qimg.commands.completion import bash_script, zsh_script

REPO = Path(__file__).resolve().parents[2]
MAN_PAGE = REPO / "docs" / "qimg.1"

# qemu-img options qimg refuses by name: (command line, the option named).
REFUSED = [
    (["convert", "-r", "1M", "a", "b"], "-r"),
    (["convert", "--object", "secret,id=s", "a", "b"], "--object"),
    (["convert", "--salvage", "a", "b"], "--salvage"),
    (["amend", "--force", "-o", "compat=1.1", "a.qcow2"], "--force"),
    (["amend", "--object", "secret,id=s", "-o", "compat=1.1", "a.qcow2"], "--object"),
    (["resize", "--object", "secret,id=s", "a.qcow2", "1G"], "--object"),
]


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        status = cli.main(argv)
    except SystemExit as stop:  # --help and argparse errors
        status = int(stop.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(("argv", "flag"), REFUSED)
def test_refused_options_are_refused_by_name_and_kept_out_of_help(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run_main(argv, capsys)
    assert (status, out) == (1, "")
    assert err == f"qimg: {argv[0]} option {flag} is not supported by qimg\n"
    status, out, err = _run_main([argv[0], "--help"], capsys)
    assert (status, err) == (0, "")
    assert not re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", out), out
    assert "UNSUPPORTED" not in out.upper()


def test_every_shown_argument_is_described_and_every_command_has_examples() -> None:
    parser = cli.build_parser()
    commands = commands_of(parser)
    assert [name for name, _, _ in commands] == list(cli.COMMANDS)
    assert example_lines(parser)
    for name, summary, p in commands:
        assert summary, name
        assert p.description, name
        examples = example_lines(p)
        assert examples and all(e.startswith("qimg ") or "qimg " in e for e in examples), name
        for action in [*visible_options(p), *positionals(p)]:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)


def test_help_ends_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for name in cli.COMMANDS:
        status, out, _ = _run_main([name, "--help"], capsys)
        assert status == 0
        tail = out.rstrip("\n").split("\n\n")[-1]
        assert tail.startswith("examples:\n  $ "), (name, tail)
        assert f"qimg {name}" in tail, (name, tail)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    for spelling in ("-V", "--version"):
        assert _run_main([spelling], capsys) == (0, f"qimg {__version__}\n", "")


def test_start_up_imports_only_what_the_command_runs(tmp_path: Path) -> None:
    image = tmp_path / "small.qcow2"
    from qimg import create

    create(str(image), 1 << 20, format="qcow2")
    # Run in a fresh interpreter: which modules a command line loads.
    probe = (
        "import sys\n"
        "from qimg.cli import main\n"
        "status = main(sys.argv[1:])\n"
        "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n"
        "sys.exit(status)\n"
    )
    heavy = {"typing", "logging", "dataclasses", "json", "socket", "qimg.image", "qimg.spec"}

    def loaded(*args: str) -> set[str]:
        proc = subprocess.run(
            [sys.executable, "-c", probe, *args],
            capture_output=True,
            text=True,
            check=False,
            env={k: v for k, v in os.environ.items() if k != "QIMG_LOG"},
        )
        assert proc.returncode == 0, proc.stderr
        return set(proc.stderr.split())

    assert not loaded("--version") & (heavy | {"argparse", "re"})
    assert not loaded("info", str(image)) & heavy
    assert not loaded("info", "--output=json", str(image)) & heavy
    # Asking for diagnostics is what brings in logging.
    assert "logging" in loaded("-v", "info", str(image))


# --------------------------------------------------------------------- -v, QIMG_LOG


def _qimg(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "QIMG_LOG"}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "qimg", *args],
        capture_output=True,
        text=True,
        check=False,
        env=environ,
        stdin=subprocess.DEVNULL,
    )


def test_verbose_logs_to_stderr_and_leaves_stdout_alone(tmp_path: Path) -> None:
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    assert_ok(_qimg("create", "-q", "-f", "qcow2", base, "1M"))
    assert_ok(_qimg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top))
    plain = _qimg("info", "--backing-chain", top)
    assert_ok(plain)
    assert plain.stderr == ""
    for argv, env in (
        (["-v", "info", "--backing-chain", top], None),
        (["info", "--backing-chain", top, "-v"], None),
        (["info", "--backing-chain", top], {"QIMG_LOG": "info"}),
    ):
        got = _qimg(*argv, env=env)
        assert_ok(got)
        assert got.stdout == plain.stdout
        assert got.stderr == (
            f"qimg: info: opened image {top}: format qcow2, driver file\n"
            f"qimg: info: opened backing file {base}: format qcow2\n"
        )
    for argv, env in ((["-vv", "info", top], None), (["info", top], {"QIMG_LOG": "DEBUG"})):
        got = _qimg(*argv, env=env)
        assert_ok(got)
        assert "qimg: debug: command line: " in got.stderr
    got = _qimg("info", top, env={"QIMG_LOG": "loud"})
    assert_ok(got)
    assert got.stderr == (
        "qimg: warning: QIMG_LOG=loud is not one of debug, info, warning, error; ignored\n"
    )


def test_verbose_convert_says_which_way_the_copy_goes(tmp_path: Path) -> None:
    src, dst = str(tmp_path / "src.qcow2"), str(tmp_path / "dst.raw")
    assert_ok(_qimg("create", "-q", "-f", "qcow2", src, "1M"))
    got = _qimg("convert", "-v", "-O", "raw", src, dst)
    assert_ok(got)
    assert got.stdout == ""
    assert f"qimg: info: opened source {src}: format qcow2, driver file" in got.stderr
    assert "qimg: info: copy: copy engine; " in got.stderr
    assert "zero detection: zero runs of 4096 bytes or more are holes" in got.stderr
    got = _qimg("-v", "convert", "-C", "-O", "raw", src, dst)
    assert_ok(got)
    assert "qimg: info: copy: copy offload: " in got.stderr
    got = _qimg("-v", "convert", "-c", "-O", "qcow2", src, dst + ".qcow2")
    assert_ok(got)
    assert "; compressed clusters (-c);" in got.stderr


# ---------------------------------------------------------------- info's quick path


@pytest.mark.qemu
def test_quick_info_matches_the_api(tmp_path: Path, run_qemu_img: RunCommand) -> None:
    """``qimg info FILE`` reads plain files with the core alone; what it finds must be
    what :func:`qimg.info` finds (snapshots, backing files and all)."""
    import qimg
    from qimg.commands.info import _plain_infos
    from qimg.imageinfo import info_human

    base, top, raw = tmp_path / "base.qcow2", tmp_path / "top.qcow2", tmp_path / "x.raw"
    assert_ok(run_qemu_img("create", "-q", "-f", "qcow2", base, "4M"))
    assert_ok(run_qemu_img("snapshot", "-c", "first", base))
    assert_ok(run_qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top))
    assert_ok(run_qemu_img("create", "-q", "-f", "raw", raw, "1M"))
    shown = []
    for path in (top, raw):
        want = qimg.info(path, backing_chain=True)
        args = argparse.Namespace(
            filename=str(path), fmt=None, backing_chain=True, force_share=False
        )
        got = _plain_infos(args)
        assert got == want
        shown += [info_human(i) for i in got]
    assert any("Snapshot list:" in text for text in shown)  # base's, below top


# -------------------------------------------------------------------- completion


def test_bash_completion_loads_and_completes(tmp_path: Path, run_qimg: RunCommand) -> None:
    bash = shutil.which("bash")
    assert bash is not None, "bash is needed for qimg's bash completion"
    got = run_qimg("completion", "bash")
    assert_ok(got)
    assert got.stdout == bash_script(cli.build_parser())
    script = tmp_path / "qimg.bash"
    script.write_text(got.stdout)
    assert_ok(subprocess.run([bash, "-n", str(script)], capture_output=True, text=True))

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        program = (
            f"source '{script}'\ncomplete -p qimg\n"
            f"COMP_WORDS=(qimg {line}); COMP_CWORD={len(words)}; _qimg\n"
            'for word in "${COMPREPLY[@]}"; do printf "%s\\n" "$word"; done\n'
        )
        proc = subprocess.run(
            [bash, "--norc", "-c", program], capture_output=True, text=True, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr
        first, *rest = proc.stdout.splitlines()
        assert first.startswith("complete ") and first.endswith(" -F _qimg qimg")
        return rest

    assert complete("conv") == ["convert"]
    assert complete("") == list(cli.COMMANDS)
    assert complete("info", "-f", "") == ["qcow2", "raw"]
    assert complete("-v", "convert", "-O", "q") == ["qcow2"]
    assert complete("info", "--output", "=", "j") == ["json"]
    assert complete("convert", "-t", "wr") == ["writeback", "writethrough"]
    assert complete("convert", "--obj") == []  # refused options are not offered
    assert "--backing-chain" in complete("info", "--")
    assert complete("completion", "") == ["bash", "zsh"]
    (tmp_path / "disk.qcow2").touch()
    assert complete("info", "di") == ["disk.qcow2"]


def test_zsh_completion(tmp_path: Path, zsh: str) -> None:
    """The zsh script's shape, and zsh's own syntax check of it."""
    script = zsh_script(cli.build_parser())
    assert script.startswith("#compdef qimg\n")
    assert "compdef _qimg qimg" in script
    for name in cli.COMMANDS:
        assert f"\n        ({name})\n" in script
    assert "'-f[image format (qcow2 or raw; default: probe)]:fmt:(qcow2 raw)'" in script
    assert "--object" not in script and "--salvage" not in script
    # Every line's single quotes pair up ('\'' counts as a closed pair plus one).
    for line in script.splitlines():
        assert line.replace("'\\''", "").count("'") % 2 == 0, line
    path = tmp_path / "_qimg"
    path.write_text(script)
    assert_ok(subprocess.run([zsh, "-n", str(path)], capture_output=True, text=True))


# ---------------------------------------------------------------------- man page


def test_checked_in_man_page_is_current() -> None:
    from qimg.manpage import render

    assert MAN_PAGE.read_text() == render(), (
        "docs/qimg.1 is stale: regenerate it with `python -m qimg.manpage -o docs/qimg.1`"
    )


def test_man_page_renders_without_warnings(groff: str) -> None:
    page = MAN_PAGE.read_text()
    assert page.count(".TH ") == 1
    for name in cli.COMMANDS:
        assert f"\n.SS {name}\n" in page
    for width in ("60n", "80n", "120n"):
        proc = subprocess.run(
            [groff, "-man", "-Tutf8", "-ww", f"-rLL={width}", "-z"],
            input=page,
            capture_output=True,
            text=True,
        )
        assert (proc.returncode, proc.stderr) == (0, ""), width
