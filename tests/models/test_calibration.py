"""Calibration: the ECE against a hand computation, the temperature fit against a known
temperature, the reliability diagram as a real PNG, the temperature in the artifact."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import calibration, nets
from models.checkpoint import TEMPERATURE_KEY, ArtifactConfig, MetaModel
from models.maml import InnerLoopConfig
from models.params import from_bytes


def test_ece_matches_a_hand_computed_example() -> None:
    # 15 bins of width 1/15 (counted from 0): 0.95, 0.97 and 1.0 are in the last (14),
    # 0.5 in bin 7 (7/15 = 0.467 < 0.5 <= 0.533), 0.3 in bin 4 (0.267 < 0.3 <= 0.333).
    confidence = torch.tensor([0.95, 0.97, 1.0, 0.5, 0.5, 0.3], dtype=torch.float64)
    correct = torch.tensor([True, False, True, True, True, False])
    # last bin: 3 queries, mean confidence (0.95 + 0.97 + 1) / 3 = 0.97333, accuracy 2/3
    # bin 7: 2 queries, confidence 0.5, accuracy 1; bin 4: 1 query, confidence 0.3, accuracy 0
    expected = 3 / 6 * abs(2 / 3 - 2.92 / 3) + 2 / 6 * abs(1 - 0.5) + 1 / 6 * abs(0 - 0.3)
    assert calibration.ece(confidence, correct) == pytest.approx(expected, abs=1e-12)
    rel = calibration.reliability(confidence, correct)
    assert rel.counts[14] == 3 and rel.counts[7] == 2 and rel.counts[4] == 1
    assert sum(rel.counts) == 6 and math.isnan(rel.accuracy[0])
    perfect = calibration.ece(torch.tensor([1.0, 1.0]), torch.tensor([True, True]))
    assert perfect == 0.0


def synthetic(temperature: float, rows: int, way: int, seed: int) -> calibration.Group:
    """Logits z and labels drawn from softmax(z / temperature): that temperature is the
    one that makes z calibrated, so the fit must recover it."""
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(rows, way, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)
    return logits, labels.flatten()


@pytest.mark.parametrize("true", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(true: float) -> None:
    groups = [synthetic(true, 6000, 5, seed=1), synthetic(true, 6000, 20, seed=2)]
    fitted = calibration.fit_temperature(groups)
    assert fitted == pytest.approx(true, rel=0.05)
    assert calibration.nll(groups, fitted) <= calibration.nll(groups, true) + 1e-9
    for other in (0.8 * fitted, 1.25 * fitted):  # a minimum: both sides are worse
        assert calibration.nll(groups, other) > calibration.nll(groups, fitted)


def test_a_fitted_temperature_lowers_the_ece_of_miscalibrated_probabilities() -> None:
    logits, labels = synthetic(2.0, 20000, 10, seed=3)  # softmax(z) is over-confident
    fitted = calibration.fit_temperature([(logits, labels)])
    before = calibration.probabilities(logits, 1.0)
    after = calibration.probabilities(logits, fitted)
    ece_before = calibration.ece(before.max(-1).values, before.argmax(-1) == labels)
    ece_after = calibration.ece(after.max(-1).values, after.argmax(-1) == labels)
    assert ece_after < 0.02 < ece_before
    assert torch.equal(before.argmax(-1), after.argmax(-1))  # the predictions do not change


def test_reliability_diagram_is_a_png_with_one_panel_per_protocol() -> None:
    rng = np.random.default_rng(0)
    confidence = torch.tensor(rng.uniform(0.2, 1.0, 500))
    correct = torch.tensor(rng.uniform(0, 1, 500)) < confidence
    rel = calibration.reliability(confidence, correct)
    data = calibration.reliability_png([[("5W1S ECE=0.010", rel), ("20W1S", rel)], [("X", rel)]])
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (520, 568)
    pixels = np.asarray(image)
    assert (pixels == calibration.BAR).all(-1).sum() > 1000  # accuracy bars drawn
    assert (pixels[284:, 260:] == 255).all()  # the shorter row is padded with white
    with pytest.raises(ValueError):
        calibration.reliability_png([])


def tiny_classifier(temperature: float | None) -> MetaModel:
    torch.manual_seed(0)
    arch = {"kind": "conv4", "channels": 8, "out_features": 5, "readout": "map"}
    net = nets.build(arch)
    config = ArtifactConfig(
        "tiny",
        "omniglot",
        arch,
        {"kind": "classification", "input_shape": [1, 28, 28]},
        InnerLoopConfig(steps=1, lr=1.0, adapt="head"),
    )
    params = {n: p.detach() for n, p in net.named_parameters()}
    return MetaModel(config, params, {}, "", temperature)


def test_the_temperature_travels_in_the_weights_and_changes_the_version(tmp_path: Path) -> None:
    plain, warm = tiny_classifier(None), tiny_classifier(0.37)
    assert plain.temperature == 1.0 and warm.temperature == 0.37
    assert TEMPERATURE_KEY not in from_bytes(plain.weights_bytes())  # old artifacts unchanged
    v1, v2 = plain.save(tmp_path / "plain"), warm.save(tmp_path / "warm")
    assert v1 != v2
    loaded = MetaModel.load(tmp_path / "warm")
    assert loaded.calibration == pytest.approx(0.37) and loaded.version == v2
    assert set(loaded.params) == set(plain.params)  # the temperature is not a net parameter
    assert MetaModel.load(tmp_path / "plain").calibration is None
