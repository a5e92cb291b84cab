"""The Omniglot family: PNG decoding against Pillow, loading, the split, episodes,
preprocessing, the Conv4 net and (when shipped) the artifact."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import nets
from models.checkpoint import MetaModel
from models.tasks import omniglot
from models.tasks.png import PNGError, decode_gray

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "omniglot"
ARTIFACT = ROOT / "models" / "artifacts" / "omniglot"

needs_data = pytest.mark.skipif(not (DATA / omniglot.ZIPS[0]).exists(), reason="no Omniglot data")


@pytest.fixture(scope="session")
def data() -> omniglot.Omniglot:
    return omniglot.load(DATA)


def pillow_gray(png: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(png)).convert("L"))


def real_pngs(count: int) -> list[bytes]:
    out = []
    for name in omniglot.ZIPS:
        with zipfile.ZipFile(DATA / name) as zf:
            entries = [e for e in zf.namelist() if e.endswith(".png")]
            step = max(1, len(entries) // count)
            out += [zf.read(e) for e in entries[::step][:count]]
    return out


# -- PNG decoder --------------------------------------------------------------------------
@needs_data
def test_png_decoder_matches_pillow_on_omniglot_files() -> None:
    for png in real_pngs(25):
        ours = decode_gray(png)
        assert ours.dtype == np.uint8 and ours.shape == (105, 105)
        np.testing.assert_array_equal(ours, pillow_gray(png))


def test_png_decoder_matches_pillow_on_8bit_with_every_filter() -> None:
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.integers(0, 9, (33, 47)), axis=1).astype(np.uint8)
    noisy = rng.integers(0, 256, (21, 13), dtype=np.uint8)
    for array in (smooth, noisy, smooth.T.copy()):
        buf = io.BytesIO()
        Image.fromarray(array, mode="L").save(buf, "PNG")
        np.testing.assert_array_equal(decode_gray(buf.getvalue()), array)
    # Pillow's adaptive filtering picks several filters; force each one explicitly too
    from models.tasks import png as pngmod

    raw = smooth.astype(np.int64)
    height, width = raw.shape
    for kind in range(5):
        rows = []
        prev = np.zeros(width, dtype=np.int64)
        for r in range(height):
            cur = raw[r]
            left = np.concatenate([[0], cur[:-1]])
            upleft = np.concatenate([[0], prev[:-1]])
            pred = [
                np.zeros_like(cur),
                left,
                prev,
                (left + prev) // 2,
                np.array(
                    [
                        pngmod._paeth(int(a), int(b), int(c))
                        for a, b, c in zip(left, prev, upleft, strict=True)
                    ]
                ),
            ][kind]
            rows.append(bytes([kind]) + ((cur - pred) & 0xFF).astype(np.uint8).tobytes())
            prev = cur
        decoded = pngmod._unfilter(b"".join(rows), height, width, 1)
        np.testing.assert_array_equal(decoded, smooth)


def test_png_decoder_rejects_garbage() -> None:
    with pytest.raises(PNGError):
        decode_gray(b"not a png at all")


# -- loading and the split ----------------------------------------------------------------
@needs_data
def test_dedup_counts(data: omniglot.Omniglot) -> None:
    assert data.raw_files == 2720 + 3120
    assert len(set(data.alphabets)) == 8
    assert data.images.shape == (242, 20, 1, 28, 28)
    assert len(set(data.characters)) == 242
    assert data.images.shape[0] * data.images.shape[1] == 4840


@needs_data
def test_split_holds_out_whole_alphabets(data: omniglot.Omniglot) -> None:
    train, test = omniglot.split(data)
    assert train.classes == 4 * 203 and test.classes == 39
    assert not any(n.split("/")[0] in omniglot.HELD_OUT for n in train.names)
    assert all(n.split("/")[0] in omniglot.HELD_OUT for n in test.names)
    record = omniglot.split_record(data)
    assert record["held_out_alphabets"] == sorted(omniglot.HELD_OUT)


@needs_data
def test_training_episodes_never_show_held_out_images(data: omniglot.Omniglot) -> None:
    train, test = omniglot.split(data)
    held = {t.numpy().tobytes() for t in test.images.flatten(0, 1)}
    known = {t.numpy().tobytes() for t in train.images.flatten(0, 1)}
    ep = omniglot.sample(torch.Generator().manual_seed(0), train, 3, 20, 2, 3)
    for x in torch.cat([ep.xs.flatten(0, 1), ep.xq.flatten(0, 1)]):
        key = x.numpy().tobytes()
        assert key in known and key not in held


@needs_data
def test_episode_shapes_and_labels(data: omniglot.Omniglot) -> None:
    _, test = omniglot.split(data)
    g = torch.Generator().manual_seed(1)
    for way, shot, queries in ((5, 1, 15), (20, 5, 5), (2, 10, 10)):
        ep = omniglot.sample(g, test, 2, way, shot, queries)
        assert ep.xs.shape == (2, way * shot, 1, 28, 28)
        assert ep.xq.shape == (2, way * queries, 1, 28, 28)
        assert ep.ys.dtype == torch.int64
        assert ep.ys[0].tolist() == [c for c in range(way) for _ in range(shot)]
        assert ep.yq[1].tolist() == [c for c in range(way) for _ in range(queries)]
        assert ep.ws.shape == (2, way * shot) and bool((ep.wq == 1).all())
        # support and query drawings of a class are distinct drawings of one character
        for b in range(2):
            s = ep.xs[b].reshape(way, shot, -1)
            q = ep.xq[b].reshape(way, queries, -1)
            assert not any(torch.equal(a, c) for a in s[0] for c in q[0])
    with pytest.raises(ValueError):
        omniglot.sample(g, test, 1, 20, 10, 11)


# -- preprocessing ------------------------------------------------------------------------
@needs_data
def test_preprocess_of_a_105px_upload_is_the_training_tensor(data: omniglot.Omniglot) -> None:
    with zipfile.ZipFile(DATA / omniglot.ZIPS[0]) as zf:
        entry = "images_background_small1/Balinese/character01/0108_01.png"
        upload = pillow_gray(zf.read(entry))  # what the service gets from Pillow
    index = data.characters.index("Balinese/character01")
    x = omniglot.preprocess(upload)
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x, data.images[index, 0])
    assert torch.equal(omniglot.preprocess(upload), x)  # deterministic
    assert torch.equal(omniglot.preprocess(upload.astype(np.float32) / 255.0), x)


def test_preprocess_any_size_and_orientation() -> None:
    paper = np.full((40, 90), 255, dtype=np.uint8)
    paper[10:30, 40:50] = 0  # a dark stroke
    x = omniglot.preprocess(paper)
    assert x.shape == (1, 28, 28)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x[0, 14, 14]) > 0.5 and float(x[0, 0, 0]) == 0.0  # ink is 1, paper 0
    assert omniglot.preprocess(np.stack([paper, paper])).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError):
        omniglot.preprocess(np.zeros((2, 3, 4, 5), dtype=np.uint8))


def test_augment_keeps_shape_and_identity_at_zero() -> None:
    x = torch.rand(4, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    assert omniglot.augment(g, x, 0.1, 0.1, 0.2).shape == x.shape
    torch.testing.assert_close(omniglot.augment(g, x, 0.0, 0.0, 0.0), x, atol=1e-5, rtol=0)


# -- the net ------------------------------------------------------------------------------
def test_conv4_prediction_does_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    net = nets.Conv4(channels=16, out_features=20).eval()
    x = torch.rand(6, 1, 28, 28)
    alone = net(x[:1])
    together = net(x)
    assert together.shape == (6, 20)
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)
    feats = net.body(x)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(6))


# -- the shipped artifact -----------------------------------------------------------------
@needs_data
@pytest.mark.skipif(not (ARTIFACT / "config.json").exists(), reason="artifact not shipped")
def test_shipped_artifact_adapts_to_held_out_alphabets(data: omniglot.Omniglot) -> None:
    from models.tasks.omniglot import accuracies, held_out_split

    model = MetaModel.load(ARTIFACT)
    assert model.config.task["max_way"] == 20 and model.config.inner.adapt == "head"
    split = held_out_split(model, data)
    accs = accuracies(model, split, way=5, shot=1, tasks=20, queries=5, seed=7)
    assert float(accs.mean()) > 0.85


@needs_data
@pytest.mark.skipif(not (ARTIFACT / "config.json").exists(), reason="artifact not shipped")
def test_meta_test_counts_each_error_by_character_pair(data: omniglot.Omniglot) -> None:
    from models.tasks.omniglot import accuracies, confusion_table, held_out_split, meta_test

    model = MetaModel.load(ARTIFACT)
    split = held_out_split(model, data)
    accs, errors = meta_test(model, split, way=20, shot=1, tasks=6, queries=5, seed=3)
    assert torch.equal(accs, accuracies(model, split, way=20, shot=1, tasks=6, queries=5, seed=3))
    wrong = round(float((1 - accs).sum()) * 20 * 5)
    assert sum(errors.values()) == wrong > 0
    assert all(t != p and {t, p} <= set(split.names) for t, p in errors)
    table = confusion_table(errors, 6 * 20 * 5, top=2)
    assert table.startswith(f"{wrong} errors in 600 queries") and table.count("\n") == 4


# -- the training recipe ------------------------------------------------------------------
def train(argv: list[str]) -> None:
    from models.train import main

    main(["omniglot", *argv])


@needs_data
def test_training_recipe_smoke_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["--data", str(DATA), "--out", str(out), "--epochs", "0", "--iterations", "2"]
    argv += ["--val-tasks", "1", "--channels", "8", "--seed", "3", "--device", "cpu"]
    train(argv)
    model = MetaModel.load(out)
    assert model.config.training["seed"] == 3
    assert "--iterations 2" in model.config.training["command"]
    assert model.config.inner.learned_lr == "per_layer_per_step"
    assert float(model.params["head.weight"].abs().sum()) == 0.0  # adaptation starts at zero
    assert (out / "metrics.csv").read_text().count("\n") == 2  # header + one validation row
    train([*argv, "--resume"])  # already finished: resumes, trains nothing more
    assert MetaModel.load(out).version == model.version


@needs_data
def test_training_recipe_prototypical_stage_from_an_artifact(tmp_path: Path) -> None:
    common = ["--data", str(DATA), "--val-tasks", "1", "--channels", "8", "--device", "cpu"]
    first = tmp_path / "first"
    train([*common, "--out", str(first), "--epochs", "0", "--iterations", "0"])
    start = MetaModel.load(first)
    out = tmp_path / "proto"
    argv = [*common, "--out", str(out), "--init", str(first), "--epochs", "0", "--seed", "4"]
    argv += ["--proto-episodes", "2", "--proto-min-way", "5", "--proto-max-way", "8"]
    argv += ["--iterations", "1"]
    train(argv)
    model = MetaModel.load(out)
    assert model.config.training["init"] == {
        "artifact": str(first),
        "sha256": start.version,
        "training": start.config.training,
    }
    assert model.config.training["recipe"]["proto_episodes"] == 2
    assert (out / "stage1b" / "config.json").exists()
    tuned = MetaModel.load(out / "stage1b")
    changed = [n for n in start.params if not torch.equal(start.params[n], tuned.params[n])]
    assert any(n.startswith("body.") for n in changed)  # the episodes trained the body
    assert float(model.params["head.weight"].abs().sum()) == 0.0
    train([*argv, "--resume"])  # already finished: trains nothing more
    assert MetaModel.load(out).version == model.version
    with pytest.raises(ValueError, match="architecture"):  # a body of another width
        train([*argv[:-2], "--channels", "16", "--out", str(tmp_path / "bad")])


@needs_data
def test_training_recipe_records_support_shifts_and_can_learn_rates_alone(tmp_path: Path) -> None:
    common = ["--data", str(DATA), "--val-tasks", "1", "--channels", "8", "--device", "cpu"]
    first = tmp_path / "first"
    train([*common, "--out", str(first), "--epochs", "0", "--iterations", "0"])
    out = tmp_path / "shifted"
    argv = [*common, "--out", str(out), "--init", str(first), "--epochs", "0"]
    argv += ["--iterations", "2", "--meta-lr", "0", "--support-shifts", "1"]
    train(argv)
    start, model = MetaModel.load(first), MetaModel.load(out)
    assert model.config.task["support_shifts"] == {"pixels": 1, "max_images": 100}
    assert model.support_shifts is not None and start.support_shifts is None
    for name, tensor in start.params.items():  # --meta-lr 0: the body is the init's
        assert torch.equal(model.params[name], tensor), name
    assert any(float((t - 5.0).abs().max()) > 0 for t in model.lrs.values())  # rates learned
