"""The tabular family trains from a CSV of a task distribution we generate."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch

from models.checkpoint import MetaModel
from models.tasks import tabular
from models.train import main as train
from models.train import state

torch.set_num_threads(1)


def write_csv(path: Path, *, regression: bool, tasks: int = 60, rows: int = 30) -> None:
    """Regression: y = a x1 + b x2 + c per task. Classification: three named blobs per
    task, centred at random places; a text column that must be ignored."""
    rng = random.Random(0)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["customer", "x1", "x2", "note", "label"])
        for t in range(tasks):
            a, b, c = (rng.uniform(-2, 2) for _ in range(3))
            centres = {
                name: (rng.uniform(-3, 3), rng.uniform(-3, 3)) for name in ["red", "green", "blue"]
            }
            for i in range(rows):
                if regression:
                    x1, x2 = rng.uniform(-2, 2), rng.uniform(-2, 2)
                    label: object = round(a * x1 + b * x2 + c, 4)
                else:
                    name = ["red", "green", "blue"][i % 3]
                    cx, cy = centres[name]
                    x1, x2, label = cx + rng.gauss(0, 0.3), cy + rng.gauss(0, 0.3), name
                out.writerow([f"c{t}", round(x1, 4), round(x2, 4), "n/a", label])


def test_loads_numeric_features_and_groups_tasks(tmp_path: Path) -> None:
    write_csv(tmp_path / "d.csv", regression=False, tasks=4, rows=9)
    table = tabular.load_csv(
        tmp_path / "d.csv", task_column="customer", label_column="label", regression=False
    )
    assert table.features == ("x1", "x2")
    assert len(table.tasks) == 4 and table.max_way == 3
    train, val = table.split(0.25, seed=0)
    assert len(val.tasks) == 1 and not {t.name for t in train.tasks} & {t.name for t in val.tasks}
    with pytest.raises(ValueError, match="no column"):
        tabular.load_csv(
            tmp_path / "d.csv", task_column="nope", label_column="label", regression=False
        )


@pytest.mark.parametrize("regression", [True, False])
def test_meta_training_from_csv_beats_the_initialisation(tmp_path: Path, regression: bool) -> None:
    data, out = tmp_path / "d.csv", tmp_path / "art"
    write_csv(data, regression=regression)
    flags = ["--regression"] if regression else []
    train(
        [
            "tabular",
            "--data",
            str(data),
            "--task-column",
            "customer",
            "--label-column",
            "label",
            "--out",
            str(out),
            "--iterations",
            "300",
            "--validate-every",
            "300",
            "--device",
            "cpu",
            "--hidden",
            "32",
            "32",
            *flags,
        ]
    )
    meta = MetaModel.load(out)
    assert meta.config.task["features"] == ["x1", "x2"]
    table = tabular.load_csv(
        data, task_column="customer", label_column="label", regression=regression
    )
    held_out = table.only(set(meta.config.task["held_out_tasks"]))
    score = tabular.scores(meta, held_out, shots=5, tasks=200, seed=1)
    if regression:
        assert score.adapted[0] < 0.5 * score.unadapted[0]
    else:
        assert score.adapted[0] > 0.8 and score.unadapted[0] < 0.5, score


def test_train_prints_the_columns_it_used_and_those_it_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out = tmp_path / "d.csv", tmp_path / "art"
    write_csv(data, regression=True, tasks=6, rows=12)
    flags = "--iterations 1 --validate-every 1 --meta-batch 2 --hidden 4 --device cpu"
    args = ["--data", str(data), "--task-column", "customer", "--label-column", "label"]
    train(["tabular", *args, "--regression", "--out", str(out), *flags.split()])
    printed = capsys.readouterr().out
    assert "task column: customer; label column: label\nfeatures (2): x1, x2\n" in printed
    assert "dropped (1), features must be numbers in every row:\n" in printed
    assert "  note: line 2 holds 'n/a', not a finite number\n" in printed
    meta = MetaModel.load(out)
    assert meta.config.task["features"] == ["x1", "x2"]
    assert meta.config.trained_for is not None
    assert meta.config.trained_for.support == (2, 10)  # --shots' default
    assert meta.config.trained_for.inner_steps == (5, 5)  # learned per-step rates


def test_a_csv_with_nothing_dropped_says_so(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("t,a,y\nt1,1,0\nt1,2,1\n")
    table = tabular.load_csv(path, task_column="t", label_column="y", regression=True)
    assert table.dropped == ()
    assert tabular.columns_report(table, task_column="t", label_column="y").endswith(
        "features (1): a\ndropped: none"
    )


def test_a_diverging_training_stops_says_what_to_change_and_writes_no_artifact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 20: a run that went to NaN trained on, wrote NaN weights and exited 0. It stops
    at the first non-finite loss, exits 1, keeps the last finite checkpoint and names the
    flags to change. (A meta-lr of 1e6 diverges at once; the issue's run took 400 steps.)"""
    data, out = tmp_path / "d.csv", tmp_path / "art"
    write_csv(data, regression=True, tasks=6, rows=12)
    args = ["--data", str(data), "--task-column", "customer", "--label-column", "label"]
    flags = "--iterations 20 --validate-every 1 --meta-batch 2 --hidden 4 --device cpu"
    with pytest.raises(SystemExit) as exit_:
        train(
            [
                "tabular",
                *args,
                "--regression",
                "--out",
                str(out),
                *flags.split(),
                "--meta-lr",
                "1e6",
            ]
        )
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "meta-training diverged at step 2 of 20: the meta-loss is nan.\n" in err, err
    assert f"wrote no artifact to {out}; the checkpoint of step 1 is kept" in err
    assert "--inner-grad-clip" in err and "a lower --meta-lr (now 1e+06)" in err
    assert not (out / "weights.safetensors").exists()
    found = state.load(out)
    assert found is not None and found[1]["done"] == 1
