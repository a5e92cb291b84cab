"""The tabular family trains from a CSV of a task distribution we generate."""

from __future__ import annotations

import csv
import random
import re
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
                out.writerow([f"c{t}", round(x1, 4), round(x2, 4), "vip", label])


def test_loads_numeric_features_and_groups_tasks(tmp_path: Path) -> None:
    write_csv(tmp_path / "d.csv", regression=False, tasks=4, rows=9)
    table = tabular.load_csv(
        tmp_path / "d.csv", task_column="customer", label_column="label", regression=False
    )
    assert table.features == ("x1", "x2")
    assert len(table.tasks) == 4 and table.max_way == 3
    train, val = table.split(0.25, seed=0)
    assert len(val.tasks) == 1 and not {t.name for t in train.tasks} & {t.name for t in val.tasks}
    with pytest.raises(tabular.DataError, match="--task-column 'nope' is not a column"):
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
    assert printed.startswith(
        "task column: customer; label column: label\n"
        "labels: numbers, regression (--regression)\n"
        "features (2): x1, x2\n"
        "dropped columns (1), features must be numbers:\n"
        "  note: line 2 holds 'vip', not a finite number\n"
        "dropped rows: none\n"
        "using 72 rows of 6 tasks\n"
    ), printed
    meta = MetaModel.load(out)
    assert meta.config.task["features"] == ["x1", "x2"]
    assert meta.config.trained_for is not None
    assert meta.config.trained_for.support == (2, 10)  # --shots' default
    assert meta.config.trained_for.inner_steps == (5, 5)  # learned per-step rates


def test_a_csv_with_nothing_dropped_says_so(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("t,a,y\nt1,1,0\nt1,2,1\n")
    table = tabular.load_csv(path, task_column="t", label_column="y", regression=True)
    assert table.dropped == () and table.dropped_rows == () and table.dropped_tasks == ()
    assert tabular.columns_report(table, task_column="t", label_column="y").endswith(
        "features (1): a\ndropped columns: none\ndropped rows: none\nusing 2 rows of 1 tasks"
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
    assert re.search(
        r"^meta-training diverged at step 2 of 20: the meta-(loss|gradient) ", err, re.M
    )
    assert f"wrote no artifact to {out}; the checkpoint of step 1 is kept" in err
    assert "--inner-grad-clip" in err and "a lower --meta-lr (now 1e+06)" in err
    assert not (out / "weights.safetensors").exists()
    found = state.load(out)
    assert found is not None and found[1]["done"] == 1


def edit(
    path: Path, changes: dict[int, dict[str, str]], *, append: dict[int, str] | None = None
) -> None:
    """Set cells of a CSV: {line: {column: value}} (the header is line 1); ``append`` adds a
    cell at the end of a line."""
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    for line, cells in changes.items():
        row = lines[line - 1].split(",")
        for column, value in cells.items():
            row[header.index(column)] = value
        lines[line - 1] = ",".join(row)
    for line, cell in (append or {}).items():
        lines[line - 1] += "," + cell
    path.write_text("\n".join(lines) + "\n")


def test_a_missing_value_drops_its_row_not_its_column_and_every_drop_is_counted(
    tmp_path: Path,
) -> None:
    """Issue 20: one empty cell among 4,000 dropped a whole feature column, said in one
    line. Now its row goes, and every row, column and task left out is counted."""
    path = tmp_path / "d.csv"
    write_csv(path, regression=True, tasks=10, rows=12)  # 120 rows
    edit(
        path,
        {5: {"x1": ""}, 9: {"label": "NA"}, 20: {"x2": "nan"}, 21: {"x1": " ", "x2": "null"}},
        append={30: "1.5"},  # a row longer than the header
    )
    # c9 keeps one row of 12: too few to split into support and query
    edit(path, {line: {"label": ""} for line in range(110, 121)})
    table = tabular.load_csv(path, task_column="customer", label_column="label", regression=True)
    assert table.features == ("x1", "x2") and table.rows == 120
    assert table.dropped_rows == (
        ("missing a value (x1 in 2, x2 in 2, label in 12)", 15),
        ("with more cells than the header (line 30...)", 1),
    )
    assert table.dropped_tasks == (("with fewer than 2 rows", 1),)
    assert sum(t.x.shape[0] for t in table.tasks) == 120 - 16 - 1 and len(table.tasks) == 9
    report = tabular.columns_report(table, task_column="customer", label_column="label")
    assert report.endswith(
        "dropped rows: 16 of 120\n"
        "  15 missing a value (x1 in 2, x2 in 2, label in 12)\n"
        "  1 with more cells than the header (line 30...)\n"
        "dropped tasks: 1\n"
        "  1 with fewer than 2 rows\n"
        "using 103 rows of 9 tasks"
    ), report


def test_a_column_missing_in_most_rows_is_dropped_rather_than_those_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    write_csv(path, regression=False, tasks=4, rows=9)  # 36 rows
    edit(path, {line: {"x2": ""} for line in range(2, 21)})  # 19 of 36
    table = tabular.load_csv(path, task_column="customer", label_column="label", regression=None)
    assert table.features == ("x1",) and table.dropped_rows == ()
    assert ("x2", "missing in 19 of 36 rows (more than half)") in table.dropped
    edit(path, {line: {"x2": "1.0"} for line in range(2, 4)})  # 17 of 36: its rows go
    table = tabular.load_csv(path, task_column="customer", label_column="label", regression=None)
    assert table.features == ("x1", "x2")
    assert table.dropped_rows == (("missing a value (x2 in 17)", 17),)


@pytest.mark.parametrize(
    ("change", "flags", "message"),
    [
        ({}, ["--label-column", "y"], "--label-column 'y' is not a column; the columns: "),
        ({}, ["--data", "missing.csv"], "missing.csv: cannot be read as CSV ([Errno 2]"),
        ({7: {"customer": ""}}, [], "line 7 has no task id in 'customer' (1 row lacks one)"),
        ({4: {"label": "high"}}, ["--regression"], "line 4 holds 'high' in 'label', not a"),
        ({}, ["--task-column", "label"], "the task and label columns are both 'label'"),
    ],
    ids=["no such label column", "no such file", "empty task id", "text label", "one column"],
)
def test_mistakes_end_with_a_message_and_exit_2_not_a_traceback(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[int, dict[str, str]],
    flags: list[str],
    message: str,
) -> None:
    """Issue 20: a wrong --label-column raised a traceback; an empty task id was a task."""
    data = tmp_path / "d.csv"
    write_csv(data, regression=True, tasks=4, rows=6)
    edit(data, change)
    given = {"--data": str(data), "--task-column": "customer", "--label-column": "label"}
    for flag, value in zip(flags[::2], flags[1::2], strict=False):
        given[flag] = str(tmp_path / value) if flag == "--data" else value
    argv = [x for pair in given.items() for x in pair] + [f for f in flags if f == "--regression"]
    with pytest.raises(SystemExit) as exit_:
        train(["tabular", *argv, "--out", str(tmp_path / "art"), "--iterations", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastadapt train tabular: ") and message in err, err
    assert not (tmp_path / "art").exists()


def test_numeric_labels_without_a_flag_train_a_regressor_and_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 20: numeric labels without --regression silently trained a 20-way classifier.
    The kind is inferred from the labels and the output says which and how to override."""
    data, out = tmp_path / "d.csv", tmp_path / "art"
    write_csv(data, regression=True, tasks=6, rows=12)
    args = ["--data", str(data), "--task-column", "customer", "--label-column", "label"]
    flags = "--iterations 1 --validate-every 1 --meta-batch 2 --hidden 4 --device cpu"
    train(["tabular", *args, "--out", str(out), *flags.split()])
    assert (
        "labels: numbers with fractions: regression (inferred; pass --classification to "
        "make each value a class)\n" in capsys.readouterr().out
    )
    assert MetaModel.load(out).config.kind == "regression"

    whole = tmp_path / "whole.csv"  # 0/1 labels: classes, said so
    whole.write_text("t,a,y\n" + "".join(f"t{i % 3},{i},{i % 2}\n" for i in range(12)))
    table = tabular.load_csv(whole, task_column="t", label_column="y", regression=None)
    assert not table.regression and table.max_way == 2
    many = tmp_path / "many.csv"  # whole numbers, 24 distinct in a task: regression
    many.write_text("t,a,y\n" + "".join(f"t{i % 2},{i},{i}\n" for i in range(48)))
    counts = tabular.load_csv(many, task_column="t", label_column="y", regression=None)
    assert counts.regression and counts.labels.startswith(
        "labels: numbers up to 24 distinct in a task: regression (inferred"
    )
    assert table.labels.startswith("labels: whole numbers, up to 2 distinct in a task: classes")
    assert "pass --regression" in table.labels
    forced = tabular.load_csv(data, task_column="customer", label_column="label", regression=False)
    assert not forced.regression and forced.labels == "labels: classes (--classification)"


def test_the_default_inner_gradient_clip_keeps_large_targets_from_diverging(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 20: linear tasks y = a x1 + b x2 + c diverged to NaN under the defaults. With
    features in +-20 (targets up to +-80) the unclipped inner loop overshoots at once (the
    first meta-loss is inf); the default clip trains them, and the artifact adapts better
    than its initialisation."""
    rng = random.Random(0)
    data = tmp_path / "big.csv"
    with data.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["task", "x1", "x2", "y"])
        for t in range(40):
            a, b, c = (rng.uniform(-2, 2) for _ in range(3))
            for _ in range(20):
                x1, x2 = rng.uniform(-20, 20), rng.uniform(-20, 20)
                out.writerow([f"t{t}", round(x1, 3), round(x2, 3), round(a * x1 + b * x2 + c, 3)])
    args = ["--data", str(data), "--task-column", "task", "--label-column", "y", "--regression"]
    flags = "--iterations 40 --validate-every 40 --meta-batch 8 --hidden 32 32 --device cpu"
    with pytest.raises(SystemExit) as exit_:
        train(
            [
                "tabular",
                *args,
                "--out",
                str(tmp_path / "none"),
                *flags.split(),
                "--inner-grad-clip",
                "none",
            ]
        )
    assert exit_.value.code == 1 and "meta-training diverged at step" in capsys.readouterr().err
    train(["tabular", *args, "--out", str(tmp_path / "art"), *flags.split()])
    meta = MetaModel.load(tmp_path / "art")  # its weights finite, or it would not load
    assert meta.config.inner.grad_clip == tabular.FAMILY.inner_defaults.grad_clip == 10.0
    table = tabular.load_csv(data, task_column="task", label_column="y", regression=True)
    held_out = table.only(set(meta.config.task["held_out_tasks"]))
    score = tabular.scores(meta, held_out, shots=10, tasks=100, seed=1)
    assert score.adapted[0] < 0.8 * score.unadapted[0], score
