"""The command package ``daemon.cli``: ``--help`` stays light (a command's module is imported only
when the command runs), the table of commands agrees with what each module registers, and the one
error wrapper turns library errors into the messages and exit codes the commands have always had."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys

import pytest

from daemon.cli import PLUGINS, build_parser, errors

HEAVY = ("numpy", "onnxruntime", "sqlalchemy", "starlette", "cv2", "yaml")


def _loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter has imported after running ``code``."""
    probe = f"import sys\n{code}\nprint(__import__('json').dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_help_imports_no_heavy_module() -> None:
    loaded = _loaded_after("from daemon.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert not heavy, f"`forensic-gender --help` imported {heavy[:10]}"
    assert not [m for m in loaded if m.startswith("daemon.") and not m.startswith(("daemon.cli", "daemon.logs", "daemon.paths"))]


def test_a_command_imports_only_its_own_module() -> None:
    loaded = _loaded_after("from daemon.cli import main\ntry:\n    main(['near', '--help'])\nexcept SystemExit:\n    pass")
    assert "daemon.cli.near" in loaded
    assert not {"daemon.cli.queries", "daemon.service", "daemon.web", "onnxruntime"} & loaded


def _registered(module: str) -> dict[str, str | None]:
    """Command -> help, as ``module``'s ``register_cli`` adds them."""
    sub = argparse.ArgumentParser(prog="forensic-gender").add_subparsers()
    importlib.import_module(module).register_cli(sub)
    return {a.dest: a.help for a in sub._choices_actions}  # argparse has no public walk


def test_the_table_of_commands_agrees_with_the_modules() -> None:
    modules = dict.fromkeys(module for module, _, _ in PLUGINS.values())
    for module in modules:
        expected = {c: text for c, (m, _, text) in PLUGINS.items() if m == module}
        assert _registered(module) == expected, module


def test_a_deferred_command_parses_as_its_own_parser() -> None:
    args = build_parser().parse_args(["persons", "merge", "3", "4", "--db", "sqlite:///x.db"])
    assert (args.command, args.action, args.keep, args.other, args.db) == ("persons", "merge", 3, 4, "sqlite:///x.db")
    assert args.func.__name__ == "cmd_persons"
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["faces", "--format", "xml"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("table", [errors.COMMAND_ERRORS, errors.STARTUP_ERRORS])
def test_every_error_the_wrapper_names_exists(table: tuple[tuple[str, ...], ...]) -> None:
    """The errors are named as text (the wrapper imports nothing): a renamed class must fail here."""
    for module, name, *_ in table:
        cls = getattr(importlib.import_module(module), name, None)
        assert isinstance(cls, type) and issubclass(cls, Exception), f"{module}.{name}"


def _run(err: BaseException, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    def cmd(args: argparse.Namespace) -> int:
        raise err

    code = errors.guarded(cmd)(argparse.Namespace(command="faces"))
    return code, capsys.readouterr().err


def test_the_wrapper_reports_known_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from daemon.queries.filters import FilterError
    from daemon.queries.media import MediaError
    from daemon.queries.output import OutputError
    from daemon.store.persons import PersonError

    assert _run(errors.CliError("face 9 does not exist", 1), capsys) == (1, "forensic-gender faces: face 9 does not exist\n")
    assert _run(errors.CliError("bad\x1b[2J"), capsys) == (2, "forensic-gender faces: bad\\x1b[2J\n")
    assert _run(FilterError(["--a: x", "--b: y"]), capsys) == (2, "forensic-gender faces: --a: x\nforensic-gender faces: --b: y\n")
    assert _run(OutputError("-o x: inside a root"), capsys) == (2, "forensic-gender faces: -o x: inside a root\n")
    assert _run(MediaError("gone", "image gone"), capsys) == (1, "forensic-gender faces: image gone\n")
    assert _run(PersonError("no person 5"), capsys) == (2, "forensic-gender faces: no person 5\n")


def test_the_wrapper_lets_other_errors_through() -> None:
    from daemon.config import ConfigError

    for err in (RuntimeError("bug"), ConfigError(["x: bad"])):

        def cmd(args: argparse.Namespace, err: BaseException = err) -> int:
            raise err

        with pytest.raises(type(err)):
            errors.guarded(cmd)(argparse.Namespace(command="faces"))
    assert errors.startup_message(ConfigError(["x: bad"], "c.yaml")) == "c.yaml has 1 problem(s):\n  x: bad"
    assert errors.startup_message(RuntimeError("bug")) is None
