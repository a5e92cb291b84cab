"""The text family's shipped meta-model (``intents``, on the real pinned encoder) and a
small support set of three intents, for the tests of the API, the engine and the
replicas. Tests assert behaviour, not the provisional artifact's exact numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from service.settings import packaged_models_dir

INTENTS = packaged_models_dir() / "intents"
TEXTS = [
    "book a flight to paris",
    "i need a plane ticket to tokyo",
    "find me flights to new york tomorrow",
    "what is my account balance",
    "how much money do i have in checking",
    "show me the balance of my savings",
    "play some music",
    "put on my favourite song",
    "play the latest album by adele",
]
LABELS = ["flight"] * 3 + ["balance"] * 3 + ["music"] * 3
SUPPORT = {"inputs": TEXTS, "targets": LABELS}
QUERIES = ["book a flight to rome", "how much is in my savings account", "play some jazz"]
EXPECTED = ["flight", "balance", "music"]
# the labels' names, which the service adds as one example each (task.label_examples)
NAMES = (
    ["flight", "balance", "music"]
    if json.loads((INTENTS / "config.json").read_text())["task"].get("label_examples")
    else []
)


def adaptation(**extra: Any) -> dict[str, Any]:
    """An adaptation request of ``intents`` to SUPPORT."""
    return {"meta_model": "intents", "support": SUPPORT, **extra}


def copy_intents(target: Path, **task: Any) -> Path:
    """A copy of the shipped artifact at ``target`` with ``config.json``'s task updated
    (``encoder={...}`` updates the pinned encoder's fields). The weights (and so the
    version's sha) are unchanged: config.json is not part of it."""
    shutil.copytree(INTENTS, target)
    path = target / "config.json"
    config = json.loads(path.read_text())
    encoder = task.pop("encoder", {})
    config["task"].update(task)
    config["task"]["encoder"].update(encoder)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return target
