"""Engine fixtures: tiny seeded meta-models built in memory (no artifact files)."""

from __future__ import annotations

import pytest
import torch

from models.checkpoint import MetaModel
from tests.service.tiny_models import tiny_meta_models

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def meta_models() -> dict[str, MetaModel]:
    return tiny_meta_models()
