"""An artifact declares what it was meta-trained for (``trained_for``): the trainer writes
it, the shipped configs carry it, older artifacts without it still load (unchecked)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.checkpoint import CONFIG_FILE, ArtifactConfig, MetaModel, TrainedFor
from models.maml import InnerLoopConfig
from models.train import main as train

torch.set_num_threads(1)
ARTIFACTS = Path(__file__).resolve().parents[2] / "models" / "artifacts"


def test_the_shipped_artifacts_declare_what_they_were_trained_for() -> None:
    sinusoid = MetaModel.load(ARTIFACTS / "sinusoid").config
    assert sinusoid.trained_for == TrainedFor(support=(5, 20), inner_steps=(5, 5))
    assert tuple(sinusoid.task["shots"]) == sinusoid.trained_for.support  # the sampler's
    omniglot = MetaModel.load(ARTIFACTS / "omniglot").config
    assert omniglot.trained_for == TrainedFor(support=(1, 10), inner_steps=(10, 10))
    assert omniglot.trained_for.support[1] == omniglot.task["max_shot"]


def test_learned_per_step_rates_accept_the_trained_count_alone_fixed_rates_fewer() -> None:
    learned = InnerLoopConfig(steps=5, learned_lr="per_layer_per_step")
    assert TrainedFor.of(learned, (5, 20)).inner_steps == (5, 5)
    assert TrainedFor.of(replace(learned, learned_lr="per_param"), (5, 20)).inner_steps == (5, 5)
    assert TrainedFor.of(replace(learned, learned_lr="none"), (5, 20)).inner_steps == (1, 5)


def copy_with(tmp_path: Path, change: dict[str, object] | None) -> Path:
    """The shipped sinusoid with ``trained_for`` replaced by ``change`` (None: removed)."""
    directory = tmp_path / "sinusoid"
    shutil.copytree(ARTIFACTS / "sinusoid", directory)
    path = directory / CONFIG_FILE
    data = json.loads(path.read_text())
    if change is None:
        del data["trained_for"]
    else:
        data["trained_for"] = change
    path.write_text(json.dumps(data))
    return directory


def test_an_older_artifact_without_the_block_loads_unchecked(tmp_path: Path) -> None:
    model = MetaModel.load(copy_with(tmp_path, None))
    assert model.config.trained_for is None
    assert "trained_for" not in json.loads(model.config.to_json())  # and saves as it was
    assert model.version == MetaModel.load(ARTIFACTS / "sinusoid").version  # not in the sha


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"support": [5, 20]}, "trained_for.inner_steps: [min, max] is missing"),
        ({"support": [20, 5], "inner_steps": [5, 5]}, "1 <= min <= max"),
        ({"support": [0, 5], "inner_steps": [5, 5]}, "1 <= min <= max"),
        ({"support": [5, 20], "inner_steps": [5, 5], "way": [2, 3]}, "trained_for.way"),
        ({"support": [5, 20], "inner_steps": [1, 4]}, "leaves out the default inner.steps 5"),
    ],
)
def test_a_bad_block_is_refused_naming_it(
    tmp_path: Path, block: dict[str, object], message: str
) -> None:
    directory = copy_with(tmp_path, block)
    with pytest.raises(ValueError, match=str(directory / CONFIG_FILE)) as refused:
        MetaModel.load(directory)
    assert message in str(refused.value)


def test_a_saved_config_keeps_the_block(tmp_path: Path) -> None:
    shipped = MetaModel.load(ARTIFACTS / "sinusoid")
    config = replace(shipped.config, trained_for=TrainedFor((3, 7), (5, 5)))
    MetaModel(config, shipped.params, shipped.lrs, "").save(tmp_path / "copy")
    text = (tmp_path / "copy" / CONFIG_FILE).read_text()
    assert ArtifactConfig.from_json(text).trained_for == TrainedFor((3, 7), (5, 5))


def test_the_sinusoid_trainer_declares_its_shots_and_steps(tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = "--iterations 2 --meta-batch 2 --validate-every 2 --inner-steps 3 --device cpu"
    train(["sinusoid", "--out", str(out), "--min-shots", "4", "--max-shots", "9", *flags.split()])
    trained = MetaModel.load(out).config.trained_for
    assert trained == TrainedFor(support=(4, 9), inner_steps=(3, 3))  # learned per-step rates
