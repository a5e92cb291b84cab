"""Artifacts describe themselves: a saved config is complete, a loaded one must be."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from models import nets
from models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, ArtifactConfig, MetaModel
from models.maml import ADDED_LATER, InnerLoopConfig, Learner, mse_loss
from tests.diverged import write_diverged

ARTIFACTS = Path(__file__).resolve().parents[2] / "models" / "artifacts"


def shipped_keys() -> list[tuple[str, str, str]]:
    """(artifact, block, key) for every key of each shipped config's architecture and inner."""
    out = []
    for name in ("omniglot", "sinusoid"):
        data = json.loads((ARTIFACTS / name / CONFIG_FILE).read_text())
        out += [(name, block, key) for block in ("architecture", "inner") for key in data[block]]
    return out


def copy_without(tmp_path: Path, name: str, block: str, key: str) -> Path:
    directory = tmp_path / name
    shutil.copytree(ARTIFACTS / name, directory)
    path = directory / CONFIG_FILE
    data = json.loads(path.read_text())
    del data[block][key]
    path.write_text(json.dumps(data))
    return directory


@pytest.mark.parametrize(("name", "block", "key"), shipped_keys())
def test_loading_a_config_that_lacks_a_key_names_it(
    tmp_path: Path, name: str, block: str, key: str
) -> None:
    directory = copy_without(tmp_path, name, block, key)
    expected = f"{directory / CONFIG_FILE}: {block}.{key} is missing"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        MetaModel.load(directory)


def test_the_shipped_configs_are_complete() -> None:
    for name in ("omniglot", "sinusoid"):
        data = json.loads((ARTIFACTS / name / CONFIG_FILE).read_text())
        assert data["architecture"] == nets.resolve(data["architecture"])
        # options added since an artifact was saved take the value it adapts with
        assert {**ADDED_LATER, **data["inner"]} == InnerLoopConfig.from_dict(
            data["inner"]
        ).to_dict()
        assert MetaModel.load(ARTIFACTS / name).config.architecture == data["architecture"]


def test_an_artifact_saved_before_head_init_starts_from_its_meta_learned_head() -> None:
    data = json.loads((ARTIFACTS / "sinusoid" / CONFIG_FILE).read_text())
    assert "head_init" not in data["inner"]
    assert InnerLoopConfig.from_dict(data["inner"]).head_init == "meta"


def test_an_unknown_inner_option_is_refused() -> None:
    data = json.loads((ARTIFACTS / "sinusoid" / CONFIG_FILE).read_text())
    data["inner"]["momentum"] = 0.9
    with pytest.raises(ValueError, match=r"^x\.json: inner\.momentum: not an inner-loop option"):
        ArtifactConfig.from_json(json.dumps(data), "x.json")


def test_a_config_built_in_code_is_completed_and_saved_complete(tmp_path: Path) -> None:
    partial: dict[str, Any] = {"kind": "mlp", "hidden": [8]}
    task = {"kind": "regression", "input_shape": [1]}
    config = ArtifactConfig("tiny", "sinusoid", partial, task, InnerLoopConfig(steps=2))
    assert config.architecture == nets.resolve(partial)
    assert set(config.architecture) == {"kind", "in_features", "hidden", "out_features"} | {
        "standardize"
    }
    net = nets.build(config.architecture)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    model = MetaModel(config, params, Learner(net, mse_loss, config.inner).init_lrs(params), "")
    model.save(tmp_path / "tiny")
    saved = json.loads((tmp_path / "tiny" / CONFIG_FILE).read_text())
    assert saved["architecture"] == config.architecture
    back = MetaModel.load(tmp_path / "tiny")
    assert back.config == config
    for name, tensor in params.items():
        assert torch.equal(back.params[name], tensor)


def test_weights_that_are_not_finite_are_neither_written_nor_loaded(tmp_path: Path) -> None:
    """Issue 20: a diverged training wrote an artifact of NaN weights that every command
    then took. Saving refuses them (nothing written), and so does every load (a directory,
    a database row, an upload: all go through ``from_bytes``), naming what is not finite."""
    model = MetaModel.load(ARTIFACTS / "sinusoid")
    broken = {**model.params, "head.bias": torch.full_like(model.params["head.bias"], torch.inf)}
    with pytest.raises(
        ValueError, match=r"not written: .*in 1 of 12 tensors \(head\.bias\).*diverged"
    ):
        MetaModel(model.config, broken, model.lrs, version="").save(tmp_path / "inf")
    assert not (tmp_path / "inf" / WEIGHTS_FILE).exists()
    lrs = {n: t * float("nan") for n, t in model.lrs.items()}
    with pytest.raises(ValueError, match=r"NaN or infinity in 6 of 12 tensors \(inner_lr\."):
        MetaModel(model.config, model.params, lrs, version="").save(tmp_path / "rates")

    write_diverged(ARTIFACTS / "sinusoid", tmp_path / "nan")
    expected = f"{tmp_path / 'nan'}: weights.safetensors holds NaN or infinity in 6 of 12 tensors"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
        MetaModel.load(tmp_path / "nan")
