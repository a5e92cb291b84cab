"""Support-set shifts: pixels move as stated, sets grow in a fixed order, and an artifact
that records them adapts on the grown set."""

from __future__ import annotations

import pytest
import torch

from models import nets
from models.augment import SupportShifts, shift
from models.checkpoint import ArtifactConfig, MetaModel
from models.maml import InnerLoopConfig


def moved(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Reference: pixel (r, c) of the result is x[r - dy, c - dx], or 0 outside x."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    for r in range(h):
        for c in range(w):
            if 0 <= r - dy < h and 0 <= c - dx < w:
                out[..., r, c] = x[..., r - dy, c - dx]
    return out


@pytest.mark.parametrize("dx,dy", [(1, 0), (-1, 0), (0, 1), (0, -1), (2, -1)])
def test_shift_moves_ink_and_fills_with_paper(dx: int, dy: int) -> None:
    x = torch.rand(2, 3, 1, 5, 6) + 1.0  # no zeros of its own
    torch.testing.assert_close(shift(x, dx, dy), moved(x, dx, dy), rtol=0, atol=0)


def test_expand_appends_four_shifted_copies_per_task() -> None:
    shifts = SupportShifts(pixels=1, max_images=100)
    x = torch.rand(2, 3, 1, 4, 4)  # (B, K, C, H, W)
    y = torch.tensor([[0, 1, 2], [2, 1, 0]])
    w = torch.ones(2, 3)
    xe, ye, we = shifts.expand(x, y, w)
    assert xe.shape == (2, 15, 1, 4, 4) and ye.shape == (2, 15) and we.shape == (2, 15)
    blocks = [x, moved(x, 1, 0), moved(x, -1, 0), moved(x, 0, 1), moved(x, 0, -1)]
    torch.testing.assert_close(xe, torch.cat(blocks, dim=1), rtol=0, atol=0)
    assert torch.equal(ye, y.repeat(1, 5)) and torch.equal(we, w.repeat(1, 5))
    # one task, regression-shaped targets (K, O): the K axis is the one that grows
    xo, yo, wo = shifts.expand(x[0], torch.rand(3, 2), w[0])
    assert xo.shape == (15, 1, 4, 4) and yo.shape == (15, 2) and wo.shape == (15,)


def test_sets_that_would_outgrow_max_images_stay_as_given() -> None:
    shifts = SupportShifts(pixels=1, max_images=100)
    x, y, w = torch.rand(21, 1, 4, 4), torch.zeros(21, dtype=torch.long), torch.ones(21)
    assert shifts.expand(x, y, w) == (x, y, w)  # 5 x 21 > 100
    assert shifts.applies(20) and not shifts.applies(21)


def test_the_setting_comes_from_the_task_block() -> None:
    assert SupportShifts.from_task({"kind": "classification"}) is None
    spec = {"pixels": 2, "max_images": 50}
    images = {"input_shape": [1, 28, 28], "support_shifts": spec}
    assert SupportShifts.from_task(images) == SupportShifts(2, 50)
    assert SupportShifts(2, 50).to_dict() == spec
    with pytest.raises(ValueError, match="pixels"):
        SupportShifts(pixels=0)
    with pytest.raises(ValueError, match="image inputs"):  # rows of features are no images
        SupportShifts.from_task({"input_shape": [4], "support_shifts": spec})


def tiny(task_extra: dict[str, object]) -> MetaModel:
    torch.manual_seed(0)
    architecture = {"kind": "conv4", "channels": 4, "blocks": 2, "groups": 2, "image_size": 8}
    architecture["out_features"] = 3
    config = ArtifactConfig(
        name="tiny",
        family="omniglot",
        architecture=architecture,
        task={"kind": "classification", "input_shape": [1, 8, 8], **task_extra},
        inner=InnerLoopConfig(steps=3, lr=0.5, adapt="head"),
    )
    net = nets.build(architecture)
    return MetaModel(config, {n: p.detach() for n, p in net.named_parameters()}, {}, "t")


def test_a_meta_model_adapts_on_its_grown_support_set() -> None:
    plain = tiny({})
    shifted = tiny({"support_shifts": {"pixels": 1, "max_images": 20}})
    assert plain.support_shifts is None and shifted.support_shifts == SupportShifts(1, 20)
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    grown = torch.cat([x, *(moved(x, dx, dy) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)))])
    expected = plain.adapt(grown, y.repeat(5))
    got = shifted.adapt(x, y)
    for name, tensor in expected.fast.items():
        torch.testing.assert_close(got.fast[name], tensor)
    assert float(got.loss_after) == pytest.approx(float(expected.loss_after), rel=1e-6)
    assert not torch.equal(plain.adapt(x, y).fast["head.weight"], got.fast["head.weight"])
    big_x, big_y = torch.rand(6, 1, 8, 8), torch.arange(6) % 3  # 30 > 20: adapts as given
    torch.testing.assert_close(
        shifted.adapt(big_x, big_y).fast["head.weight"],
        plain.adapt(big_x, big_y).fast["head.weight"],
    )
