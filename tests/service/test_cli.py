"""`fastadapt train` and `fastadapt eval`: the models package's commands, one sub-command
per registered family, the same flags where they mean the same thing, every default shown."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from models import evaluate, train
from models.tasks import command_parser, families
from service import cli
from tests.diverged import write_diverged

FAMILIES = list(families())
COMMANDS = {"train": train, "eval": evaluate}
# what docs/training.md promises every family's `fastadapt train` takes
TRAIN_FLAGS = [
    "--out",
    "--seed",
    "--device",
    "--threads",
    "--resume",
    "--iterations",
    "--meta-batch",
    "--meta-lr",
    "--rate-lr",
    "--clip",
    "--validate-every",
    "--inner-steps",
    "--inner-lr",
    "--learned-lr",
    "--first-order",
]
EVAL_FLAGS = ["--artifact", "--tasks", "--seed", "--device", "--threads"]


@pytest.mark.parametrize(("command", "module"), COMMANDS.items())
def test_train_and_eval_delegate(
    command: str, module: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(module, "main", lambda argv: seen.append(list(argv)))
    assert cli.main([command, "sinusoid", "--out", "somewhere", "--help"]) == 0
    assert seen == [["sinusoid", "--out", "somewhere", "--help"]]


def test_unknown_commands_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bogus"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_the_families(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, family in families().items():
        assert name in shown and family.summary in shown


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_family_is_named_and_the_families_listed(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "foo", "--out", "x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'foo' is not a family" in err
    assert "families: " + ", ".join(FAMILIES) in err


def family_parsers(command: str) -> dict[str, argparse.ArgumentParser]:
    module = COMMANDS[command]
    parser = command_parser(module.PROG, module.DESCRIPTION, module.arguments)  # type: ignore[attr-defined]
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize(("command", "flags"), [("train", TRAIN_FLAGS), ("eval", EVAL_FLAGS)])
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_takes_the_common_flags_each_with_help_and_default(
    command: str, flags: list[str], name: str
) -> None:
    parser = family_parsers(command)[name]
    options = {o: a for a in parser._actions for o in a.option_strings}
    assert set(flags) <= set(options), set(flags) - set(options)
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings}: no help"
        if not action.required:
            assert "default" in parser._get_formatter()._expand_help(action) or (
                "default" in (action.help or "")
            ), f"{name} {action.option_strings}: no default shown"
    assert "(default: " in text


def test_the_common_flags_mean_the_same_for_every_family() -> None:
    parsers = family_parsers("train")
    for flag in TRAIN_FLAGS:
        kinds = {
            (type(a).__name__, a.type, a.nargs)
            for p in parsers.values()
            for a in p._actions
            if flag in a.option_strings
        }
        assert len(kinds) == 1, (flag, kinds)


def test_eval_refuses_an_artifact_of_nan_weights_with_the_reason(
    models_dir: Path, tmp_path: Path
) -> None:
    """Issue 20: `fastadapt eval` printed "nan ± nan" for a diverged artifact."""
    write_diverged(models_dir / "sinusoid", tmp_path / "diverged")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "sinusoid", "--artifact", str(tmp_path / "diverged"), "--tasks", "2"])
    message = str(exit_.value.code)
    assert message.startswith(f"fastadapt eval: cannot load {tmp_path / 'diverged'}: "), message
    assert "NaN or infinity" in message and "diverged" in message
