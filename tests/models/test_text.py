"""The text family's maths against independent references, its data split and its recipe.

The adapted head is checked against a plain autograd loop written out by hand (class
means, then gradient steps on the cross-entropy of a linear head over normalised,
scaled residual features); the in-scope score's AUROC against scikit-learn's. The
recipe runs on a few made-up CSVs, with the real encoder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor

from models import nets
from models.checkpoint import MetaModel
from models.encoder import label_text as text_label
from models.kernels import BatchedLearner
from models.maml import UNUSED_BIAS, InnerLoopConfig, Learner, cross_entropy_loss, proto_head
from models.params import Params
from models.tasks import text

torch.set_num_threads(1)
WAYS = 12  # head outputs in these tests


def make(steps: int = 3) -> tuple[Learner, Params, Params]:
    torch.manual_seed(0)
    net = nets.Residual(in_features=16, hidden=8, out_features=WAYS, scale=3.0)
    with torch.no_grad():  # a block that is not the identity, as after meta-training
        net.body.up.weight.normal_(0, 0.3)  # type: ignore[union-attr]
    inner = InnerLoopConfig(
        steps=steps, lr=0.3, adapt="head", learned_lr="per_layer_per_step", head_init="proto"
    )
    learner = Learner(net, cross_entropy_loss, inner)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    lrs = {n: torch.linspace(0.5, 0.1, steps) for n in ("head.weight", "head.bias")}
    return learner, params, lrs


def reference_features(p: Params, x: Tensor) -> Tensor:
    h = F.gelu(x @ p["body.down.weight"].T + p["body.down.bias"])
    x = x + h @ p["body.up.weight"].T + p["body.up.bias"]
    return p["body.log_scale"].exp() * x / x.norm(dim=-1, keepdim=True)


def reference_adapt(p: Params, lrs: Params, x: Tensor, y: Tensor, steps: int) -> Params:
    """Class means by a loop over classes, then steps of torch.autograd.grad."""
    z = reference_features(p, x)
    w = torch.zeros(WAYS, z.shape[1])
    b = torch.full((WAYS,), UNUSED_BIAS)
    for c in y.unique().tolist():
        mean = z[y == c].mean(0)
        w[c], b[c] = 2 * mean, -(mean @ mean)
    for step in range(steps):
        w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
        loss = F.cross_entropy(z @ w.T + b, y)
        gw, gb = torch.autograd.grad(loss, [w, b])
        w, b = w - lrs["head.weight"][step] * gw, b - lrs["head.bias"][step] * gb
    return {"head.weight": w.detach(), "head.bias": b.detach()}


def support(seed: int, ways: int, shots: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(ways).repeat_interleave(shots)
    return torch.randn(len(y), 16, generator=g), y


def test_proto_head_scores_by_distance_to_each_class_mean() -> None:
    h, y = support(1, 3, 4)
    weight, bias = proto_head(h, y, torch.ones(len(y)), WAYS)
    logits = h @ weight.T + bias
    means = torch.stack([h[y == c].mean(0) for c in range(3)])
    expected = -(torch.cdist(h, means) ** 2) + (h * h).sum(-1, keepdim=True)  # |h|^2 - |h - m|^2
    torch.testing.assert_close(logits[:, :3], expected, rtol=1e-4, atol=1e-4)
    assert bool((weight[3:] == 0).all()) and bool((bias[3:] == UNUSED_BIAS).all())


def test_proto_head_ignores_padding_rows() -> None:
    h, y = support(2, 3, 2)
    padded_h = torch.cat([h, torch.randn(5, 16)])
    padded_y = torch.cat([y, torch.full((5,), 4)])  # padding claims class 4
    w = torch.cat([torch.ones(len(y)), torch.zeros(5)])
    got = proto_head(padded_h, padded_y, w, WAYS)
    expected = proto_head(h, y, torch.ones(len(y)), WAYS)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("ways", "shots"), [(2, 1), (5, 3)])
def test_the_adapted_head_equals_a_plain_autograd_loop(ways: int, shots: int) -> None:
    learner, params, lrs = make()
    x, y = support(ways * 10 + shots, ways, shots)
    fast = learner.adapt(params, lrs, x, y, torch.ones(len(y))).fast
    expected = reference_adapt(params, lrs, x, y, learner.inner.steps)
    for name in expected:
        torch.testing.assert_close(fast[name], expected[name], rtol=1e-4, atol=1e-4)


def test_the_serving_kernels_adapt_as_the_learner() -> None:
    """The engine's batched path (vmap, and plain autograd for one client) starts from
    the same class means."""
    learner, params, lrs = make()
    sets = [support(s, 3, 2) for s in range(4)]
    batched = BatchedLearner(learner, params, lrs)
    assert batched.path == "vmap"
    x = torch.stack([s[0] for s in sets])
    y = torch.stack([s[1] for s in sets])
    w = torch.ones(y.shape)
    many = batched.adapt(x, y, w).fast
    one = batched.adapt(x[:1], y[:1], w[:1]).fast
    for i, (xi, yi) in enumerate(sets):
        expected = reference_adapt(params, lrs, xi, yi, learner.inner.steps)
        for name, t in expected.items():
            torch.testing.assert_close(many[name][i], t, rtol=1e-4, atol=1e-4)
            if i == 0:
                torch.testing.assert_close(one[name][0], t, rtol=1e-4, atol=1e-4)


def test_auroc_equals_scikit_learns() -> None:
    g = torch.Generator().manual_seed(3)
    inside = torch.randn(50, generator=g) + 1.0
    outside = torch.cat([torch.randn(40, generator=g), inside[:5]])  # ties across classes
    labels = [1] * 50 + [0] * 45
    expected = roc_auc_score(labels, torch.cat([inside, outside]).numpy())
    assert text.auroc(inside, outside) == pytest.approx(expected, abs=1e-12)


def test_the_in_scope_fit_separates_what_it_can() -> None:
    g = torch.Generator().manual_seed(4)
    inside = torch.randn(400, generator=g) * 0.5 + 3.0
    outside = torch.randn(400, generator=g) * 0.5 + 1.0
    scale, bias = text.fit_in_scope(inside, outside)
    assert scale > 0
    assert -bias / scale == pytest.approx(2.0, abs=0.1)  # halfway, classes weighted equally


# -- the data split and the recipe, on made-up CSVs ----------------------------------------------
DOMAINS = {
    "travel": ["flight"],
    "utility": ["hotel"],
    "banking": ["balance", "transfer"],
    "home": ["music"],
}
PHRASES = {
    "flight": "book a flight to {}",
    "hotel": "reserve a hotel room in {}",
    "balance": "what is the balance of my {} account",
    "transfer": "send money to my {} account",
    "music": "play some {} music",
    "alarm": "wake me up at {} tomorrow",
    "weather": "what is the weather in {}",
    "PlayMusic": "put on the song {}",
    "GetWeather": "will it rain in {}",
}
WORDS = ["paris", "rome", "tokyo", "savings", "jazz", "seven", "lima", "oslo", "cairo", "quito"]


def write_corpus(root: Path) -> Path:
    def rows(labels: list[str], splits: tuple[str, ...]) -> list[dict[str, str]]:
        out = []
        for label in labels:
            for split in splits:
                for word in WORDS:
                    out.append(
                        {
                            "split": split,
                            "label": label,
                            "text": f"{PHRASES[label].format(word)} ({split})",
                        }
                    )
        return out

    def write(name: str, data: list[dict[str, str]]) -> None:
        with (root / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            out = csv.DictWriter(f, ["split", "label", "text"])
            out.writeheader()
            out.writerows(data)

    clinc = rows(["flight", "hotel", "balance", "transfer", "music"], ("train", "valid", "test"))
    clinc += [
        {"split": s, "label": "oos", "text": f"how tall is mount {w} ({s})"}
        for s in ("train", "test")
        for w in WORDS
    ]
    write("clinc150", clinc)
    write("hwu64", rows(["alarm", "weather"], ("train", "test")))
    write("snips", rows(["PlayMusic", "GetWeather"], ("train", "test")))
    (root / "clinc150_domains.json").write_text(json.dumps(DOMAINS))
    return root


def test_held_out_data_never_reaches_meta_training(tmp_path: Path) -> None:
    corpus = text.load(write_corpus(tmp_path), text.HeldOut(clinc150_domains=("travel",)))
    assert "hotel" in corpus.train[0].texts  # utility is not held out here
    seen = {t for pool in corpus.train for ts in pool.texts.values() for t in ts}
    assert {p.name: sorted(p.texts) for p in corpus.train} == {
        "clinc150": ["balance", "hotel", "music", "transfer"],
        "snips": ["GetWeather", "PlayMusic"],
    }
    assert not any("(test)" in t for t in seen)  # only train (and CLINC's valid) splits
    assert sorted(corpus.held) == ["clinc150-travel", "hwu64"]
    assert not seen & {t for t in corpus.oos_test}
    assert all("(test)" in t for t in corpus.oos_test) and len(corpus.oos_train) == 10


def test_the_recipe_writes_an_artifact_that_adapts_to_texts(tmp_path: Path) -> None:
    from models.train import main as train_main

    (tmp_path / "data").mkdir()
    data = write_corpus(tmp_path / "data")
    out = tmp_path / "intents"
    train_main(
        [
            "text",
            "--data",
            str(data),
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "cache"),
            "--iterations",
            "3",
            "--meta-batch",
            "2",
            "--validate-every",
            "3",
            "--max-way",
            "3",
            "--max-shot",
            "4",
            "--calibration-tasks",
            "10",
            "--device",
            "cpu",
        ]
    )
    model = MetaModel.load(out)
    assert model.config.family == "text" and model.config.task["input"] == "text"
    assert model.config.task["held_out"]["datasets"] == ["hwu64"]
    assert model.in_scope is not None and model.calibration is not None
    assert (tmp_path / "cache").is_dir()  # embeddings kept for the next run
    encoder = text.SentenceEncoder(text.EncoderSpec())
    x = encoder.encode(["book a flight to lima", "book a flight to oslo", "play some jazz music"])
    adapted = model.adapt(x[:2], torch.tensor([0, 1]))
    logits = model.predict(adapted.fast, x)[:, :2]
    assert bool(logits.isfinite().all())


@pytest.mark.parametrize(
    ("label", "text"),
    [
        ("book_flight", "book flight"),
        ("BookFlight", "book flight"),
        ("card-arrival", "card arrival"),
        ("  Lost  card ", "lost card"),
        ("qa.definition", "qa definition"),
        ("___", ""),
    ],
)
def test_a_label_reads_as_its_words(label: str, text: str) -> None:
    assert text_label(label) == text
