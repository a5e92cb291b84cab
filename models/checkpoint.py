"""The MetaModel artifact: ``config.json`` + ``weights.safetensors`` + ``weights.sha256``.

The sha256 of the weights file is the meta-model's version. Learned inner learning
rates (Meta-SGD, MAML++) travel in the same safetensors file under ``inner_lr.``, and so
does a fitted softmax temperature (``calibration.temperature``, a scalar; absent: 1) and,
for families that say "none of these" (text), the in-scope score's logistic function of
the top logit (``calibration.in_scope``: [scale, bias]), so recalibrating an artifact
changes its version, as it changes its probabilities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models import nets
from models.augment import SupportShifts
from models.maml import LOSSES, AdaptResult, InnerLoopConfig, Learner
from models.params import Params, detached, from_bytes, non_finite, sha256, to_bytes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
DIGEST_FILE = "weights.sha256"
LR_PREFIX = "inner_lr."
TEMPERATURE_KEY = "calibration.temperature"
IN_SCOPE_KEY = "calibration.in_scope"


@dataclass(frozen=True)
class TrainedFor:
    """What an artifact was meta-trained for, as ``config.json``'s ``trained_for`` block.

    ``support``: the support sizes its episodes had, [min, max] points per task for
    regression, examples per class for classification. ``inner_steps``: the inner-step
    counts it accepts. With learned per-step rates that is the learned count alone: the
    rates exist for exactly those steps (further steps reuse the last one) and a prefix
    was never trained to stand alone. The service refuses requests outside these ranges.
    An artifact without the block (one saved before it existed) is not checked.
    """

    support: tuple[int, int]  # [min, max] points (regression) or per class (classification)
    inner_steps: tuple[int, int]  # [min, max] inner steps

    def __post_init__(self) -> None:
        for name in ("support", "inner_steps"):
            lo, hi = getattr(self, name)
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                raise ValueError(f"{name}: [min, max] with 1 <= min <= max, got {[lo, hi]}")
            object.__setattr__(self, name, (lo, hi))

    @classmethod
    def of(cls, inner: InnerLoopConfig, support: tuple[int, int]) -> TrainedFor:
        """What a trainer declares: its episodes' support sizes, and the inner steps it
        meta-trained (``inner.steps``; fixed rates also any fewer: the same descent
        stopped earlier, with the rate it was trained with)."""
        fixed = inner.learned_lr == "none"
        return cls(support=support, inner_steps=(1 if fixed else inner.steps, inner.steps))

    def to_dict(self) -> dict[str, list[int]]:
        return {"support": list(self.support), "inner_steps": list(self.inner_steps)}

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "trained_for") -> TrainedFor:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: an object with support and inner_steps")
        for key in ("support", "inner_steps"):
            value = data.get(key)
            if not (isinstance(value, list) and len(value) == 2):
                raise ValueError(f"{where}.{key}: [min, max] is missing")
        unknown = sorted(set(data) - {"support", "inner_steps"})
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: not a trained_for key")
        try:
            return cls(tuple(data["support"]), tuple(data["inner_steps"]))
        except ValueError as error:
            raise ValueError(f"{where}.{error}") from None


@dataclass(frozen=True)
class ArtifactConfig:
    name: str  # what clients ask for, e.g. "sinusoid"
    family: str  # task family module under models.tasks
    architecture: dict[str, Any]  # nets.build() spec, completed by nets.resolve
    task: dict[str, Any]  # {"kind": "regression"|"classification", "input_shape": [...], ...}
    inner: InnerLoopConfig  # the default adaptation, exactly as meta-trained
    training: dict[str, Any] = field(default_factory=dict)  # command, seed, iterations, ...
    trained_for: TrainedFor | None = None  # the ranges meta-trained for (None: not checked)

    def __post_init__(self) -> None:
        # A config built in code may name part of its net; the one it holds (and saves)
        # names every hyper-parameter the net depends on.
        object.__setattr__(self, "architecture", nets.resolve(self.architecture))
        trained = self.trained_for
        if trained is not None and not (
            trained.inner_steps[0] <= self.inner.steps <= trained.inner_steps[1]
        ):
            raise ValueError(
                f"trained_for.inner_steps {list(trained.inner_steps)} leaves out the default "
                f"inner.steps {self.inner.steps}"
            )

    @property
    def kind(self) -> str:
        return str(self.task["kind"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.task["input_shape"])

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "name": self.name,
            "family": self.family,
            "architecture": self.architecture,
            "task": self.task,
            "inner": self.inner.to_dict(),
            "training": self.training,
        }
        if self.trained_for is not None:
            data["trained_for"] = self.trained_for.to_dict()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = CONFIG_FILE) -> ArtifactConfig:
        """Parse a saved config. Its ``architecture`` and ``inner`` blocks must be complete:
        a missing key is a ValueError naming it, e.g. "<source>: architecture.groups is
        missing", never a code default standing in for it."""
        data = json.loads(text)
        for key in ("name", "family", "architecture", "task", "inner"):
            if key not in data:
                raise ValueError(f"{source}: {key} is missing")
        nets.parse(data["architecture"], complete=True, where=f"{source}: architecture")
        data["inner"] = InnerLoopConfig.from_dict(data["inner"], where=f"{source}: inner")
        if "trained_for" in data:  # optional: older artifacts lack it (and are not checked)
            where = f"{source}: trained_for"
            data["trained_for"] = TrainedFor.from_dict(data["trained_for"], where=where)
        try:
            return cls(**data)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


class MetaModel:
    """A loaded meta-learned initialisation: adapts per client, predicts per client."""

    def __init__(
        self,
        config: ArtifactConfig,
        params: Params,
        lrs: Params,
        version: str,
        temperature: float | None = None,
        in_scope: tuple[float, float] | None = None,
    ) -> None:
        self.config = config
        self.net = nets.build(config.architecture)
        self.learner = Learner(self.net, LOSSES[config.kind], config.inner)
        self.params = detached(params)
        self.lrs = detached(lrs)
        self.version = version
        self.calibration = temperature  # None: uncalibrated (the probabilities use 1)
        # (scale, bias): in-scope score = sigmoid(scale * top logit + bias); None: no score
        self.in_scope = in_scope
        self.support_shifts = SupportShifts.from_task(config.task)  # None: sets stay as given

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def temperature(self) -> float:
        """What a classifier's logits are divided by before the softmax (1: none fitted)."""
        return 1.0 if self.calibration is None else self.calibration

    def to(self, device: torch.device | str) -> MetaModel:
        self.net.to(device)
        self.params = {n: t.to(device) for n, t in self.params.items()}
        self.lrs = {n: t.to(device) for n, t in self.lrs.items()}
        return self

    def adapt(
        self,
        x: Tensor,
        y: Tensor,
        w: Tensor | None = None,
        *,
        steps: int | None = None,
        lr: float | None = None,
    ) -> AdaptResult:
        """One client's adaptation: x (K, ...), y (K, O) or (K,), optional weights (K,).
        Image support sets are first augmented as the artifact was meta-trained."""
        w = torch.ones(x.shape[0], device=x.device) if w is None else w
        if self.support_shifts is not None:
            x, y, w = self.support_shifts.expand(x, y, w)
        with torch.no_grad():
            return self.learner.adapt(self.params, self.lrs, x, y, w, steps=steps, lr=lr)

    def predict(self, fast: Params, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.learner.predict(self.params, fast, x)

    # -- files -------------------------------------------------------------------------------
    def tensors(self) -> Params:
        """Everything the weights file holds: parameters, learned rates, calibration."""
        tensors = {**self.params, **{LR_PREFIX + n: t for n, t in self.lrs.items()}}
        if self.calibration is not None:
            tensors[TEMPERATURE_KEY] = torch.tensor(self.calibration, dtype=torch.float64)
        if self.in_scope is not None:
            tensors[IN_SCOPE_KEY] = torch.tensor(self.in_scope, dtype=torch.float64)
        return tensors

    def weights_bytes(self) -> bytes:
        return to_bytes(self.tensors())

    def save(self, directory: str | Path) -> str:
        """Write the artifact; a ValueError, and nothing written, if a weight is not finite."""
        out = Path(directory)
        problem = diverged(self.tensors())
        if problem:
            raise ValueError(f"{out}: not written: its weights hold {problem}")
        out.mkdir(parents=True, exist_ok=True)
        data = self.weights_bytes()
        digest = sha256(data)
        (out / WEIGHTS_FILE).write_bytes(data)
        (out / DIGEST_FILE).write_text(digest + "\n")
        (out / CONFIG_FILE).write_text(self.config.to_json())
        self.version = digest
        return digest

    @classmethod
    def load(cls, directory: str | Path) -> MetaModel:
        src = Path(directory)
        expected = (src / DIGEST_FILE).read_text().strip()
        return cls.from_bytes(
            (src / CONFIG_FILE).read_text(),
            (src / WEIGHTS_FILE).read_bytes(),
            expected_sha=expected,
            source=str(src),
            config_source=str(src / CONFIG_FILE),
        )

    @classmethod
    def from_bytes(
        cls,
        config_json: str,
        weights: bytes,
        *,
        expected_sha: str,
        source: str = "artifact",
        config_source: str | None = None,
    ) -> MetaModel:
        """An artifact from its two files' contents (a directory, a database row, an
        upload): the weights' sha256 must be ``expected_sha``, the weights are safetensors
        (never pickle), and they must fit the config's net (names and shapes). A mismatch
        is a ValueError naming ``source`` (``config_source`` for the config's own errors:
        a file's path, say; default "<source>: config.json")."""
        digest = sha256(weights)
        if digest != expected_sha:
            raise ValueError(f"{source}: weights sha256 {digest} != expected {expected_sha}")
        config = ArtifactConfig.from_json(config_json, config_source or f"{source}: {CONFIG_FILE}")
        try:
            tensors = from_bytes(weights)
        except Exception as exc:  # safetensors' own error types differ between versions
            raise ValueError(f"{source}: {WEIGHTS_FILE} is not safetensors ({exc})") from None
        params, lrs, temperature, in_scope = split_weights(tensors)
        net = nets.build(config.architecture)
        expected = {n: tuple(p.shape) for n, p in net.named_parameters()}
        got = {n: tuple(params[n].shape) for n in expected if n in params}
        if got != expected:
            missing = sorted(n for n in expected if got.get(n) != expected[n])
            raise ValueError(f"{source}: weights do not fit the config's net ({missing[:3]})")
        problem = diverged(tensors)
        if problem:
            raise ValueError(f"{source}: {WEIGHTS_FILE} holds {problem}")
        return cls(config, params, lrs, digest, temperature, in_scope)


def diverged(tensors: Params) -> str | None:
    """Why weights cannot make an artifact (a NaN or an infinity: a diverged training,
    whose every adaptation would fail), naming the tensors; None when all are finite."""
    bad = non_finite(tensors)
    if not bad:
        return None
    names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    return (
        f"NaN or infinity in {len(bad)} of {len(tensors)} tensors ({names}): its meta-training "
        "diverged; train it again with smaller steps (a lower rate, an --inner-grad-clip)"
    )


def split_weights(
    tensors: Params,
) -> tuple[Params, Params, float | None, tuple[float, float] | None]:
    """A weights file's tensors -> (net parameters, learned inner rates, temperature,
    in-scope scale and bias)."""
    lrs = {n[len(LR_PREFIX) :]: t for n, t in tensors.items() if n.startswith(LR_PREFIX)}
    calibration = (TEMPERATURE_KEY, IN_SCOPE_KEY)
    params = {
        n: t for n, t in tensors.items() if not n.startswith(LR_PREFIX) and n not in calibration
    }
    temperature = tensors.get(TEMPERATURE_KEY)
    scope = tensors.get(IN_SCOPE_KEY)
    in_scope = None if scope is None else (float(scope[0]), float(scope[1]))
    return params, lrs, None if temperature is None else float(temperature), in_scope


def discover(root: str | Path) -> list[Path]:
    """Artifact directories directly under ``root`` (each holds a config.json)."""
    return sorted(p.parent for p in Path(root).glob(f"*/{CONFIG_FILE}"))
