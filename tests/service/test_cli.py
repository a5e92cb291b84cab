"""`fastadapt train` and `fastadapt eval` hand their arguments to the models package."""

from __future__ import annotations

import pytest

from models import evaluate, train
from service import cli


@pytest.mark.parametrize(("command", "module"), [("train", train), ("eval", evaluate)])
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
