"""The Omniglot family: PNG decoding against Pillow, loading, the split, episodes,
preprocessing, the Conv4 net and (when shipped) the artifact."""

from __future__ import annotations

import io
import os
import random
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
# the project's data folder, or another (a worktree beside the project): FASTADAPT_OMNIGLOT_DATA
DATA = Path(os.environ.get("FASTADAPT_OMNIGLOT_DATA", ROOT.parent / "shared" / "data" / "omniglot"))
ARTIFACT = ROOT / "models" / "artifacts" / "omniglot"

needs_data = pytest.mark.skipif(not (DATA / omniglot.ZIPS[0]).exists(), reason="no Omniglot data")


SMALL_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")


@pytest.fixture(scope="session")
def data() -> omniglot.Omniglot:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # preprocessing is several times faster on one busy core
    try:
        return omniglot.load(DATA)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder holding only the two small zips (links), as before the full set."""
    folder = tmp_path_factory.mktemp("omniglot-small")
    for name in SMALL_ZIPS:
        (folder / name).symlink_to(DATA / name)
    return folder


@pytest.fixture(scope="session")
def small(small_dir: Path) -> omniglot.Omniglot:
    return omniglot.load(small_dir)


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
def test_loader_reads_the_full_background_set_and_the_small_zips(data: omniglot.Omniglot) -> None:
    assert data.raw_files == 19280 + 2720 + 3120  # the small zips' files are duplicates
    assert len(set(data.alphabets)) == 30
    assert data.images.shape == (964, 20, 1, 28, 28)
    assert len(set(data.characters)) == 964
    assert (
        data.alphabets.count("Tifinagh") == 55
        and data.alphabets.count("Blackfoot_(Canadian_Aboriginal_Syllabics)") == 14
    )


@needs_data
def test_dedup_counts_of_the_small_zips_alone(
    small: omniglot.Omniglot, data: omniglot.Omniglot
) -> None:
    assert small.raw_files == 2720 + 3120
    assert len(set(small.alphabets)) == 8
    assert small.images.shape == (242, 20, 1, 28, 28)
    assert len(set(small.characters)) == 242
    # the same characters, the same pixels, whichever zip they were read from
    for i in (0, 100, 241):
        assert torch.equal(small.images[i], data.images[data.characters.index(small.characters[i])])


def test_loader_names_the_zips_it_needs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"images_background\.zip"):
        omniglot.load(tmp_path)


@needs_data
def test_held_out_alphabets_follow_the_recorded_rule(data: omniglot.Omniglot) -> None:
    counts = {a: data.alphabets.count(a) for a in set(data.alphabets)}
    eligible = sorted(a for a, n in counts.items() if n >= 20)
    assert tuple(sorted(random.Random(13).sample(eligible, 6))) == omniglot.HELD_OUT
    assert omniglot.default_held_out(data) == omniglot.HELD_OUT


@needs_data
def test_split_holds_out_whole_alphabets(data: omniglot.Omniglot) -> None:
    train, test = omniglot.split(data)
    held = sum(data.alphabets.count(a) for a in omniglot.HELD_OUT)
    assert held == 214 and test.classes == held and train.classes == 4 * (964 - held)
    assert not any(n.split("/")[0] in omniglot.HELD_OUT for n in train.names)
    assert all(n.split("/")[0] in omniglot.HELD_OUT for n in test.names)
    upright = omniglot.upright_train(data, omniglot.HELD_OUT)  # the calibration split
    assert upright.classes == 964 - held
    assert not any(n.split("/")[0] in omniglot.HELD_OUT for n in upright.names)
    record = omniglot.split_record(data)
    assert record["held_out_alphabets"] == sorted(omniglot.HELD_OUT)
    assert record["held_out_rule"] == omniglot.HELD_OUT_RULE
    assert len(record["train_alphabets"]) == 24 and record["held_out_characters"] == held
    with pytest.raises(ValueError, match="Klingon"):
        omniglot.split(data, ("Klingon",))


@needs_data
def test_small_zips_alone_keep_the_old_split(small: omniglot.Omniglot) -> None:
    train, test = omniglot.split(small)
    assert train.classes == 4 * 203 and test.classes == 39
    assert all(n.split("/")[0] in omniglot.SMALL_HELD_OUT for n in test.names)


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
    with zipfile.ZipFile(DATA / "images_background_small1.zip") as zf:
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
    result = meta_test(model, split, way=20, shot=1, tasks=6, queries=5, seed=3)
    accs, errors = result.accs, result.errors
    assert torch.equal(accs, accuracies(model, split, way=20, shot=1, tasks=6, queries=5, seed=3))
    wrong = round(float((1 - accs).sum()) * 20 * 5)
    assert sum(errors.values()) == wrong > 0
    assert all(t != p and {t, p} <= set(split.names) for t, p in errors)
    table = confusion_table(errors, 6 * 20 * 5, top=2)
    assert table.startswith(f"{wrong} errors in 600 queries") and table.count("\n") == 4
    # the logits kept are the task's own labels', one row per query, as the service sees them
    assert result.logits.shape == (600, 20) and result.labels.shape == (600,)
    top, correct = result.confidence()
    assert float(correct.float().mean()) == pytest.approx(float(accs.mean()), abs=1e-6)
    assert bool(((top > 0.05) & (top <= 1)).all()) and 0 <= result.unused_mass < 1


# -- the training recipe ------------------------------------------------------------------
def train(argv: list[str]) -> None:
    from models.train import main

    main(["omniglot", *argv])


@needs_data
def test_training_recipe_smoke_and_resume(tmp_path: Path, small_dir: Path) -> None:
    out = tmp_path / "run"
    argv = ["--data", str(small_dir), "--out", str(out), "--epochs", "0", "--iterations", "2"]
    argv += ["--val-tasks", "1", "--channels", "8", "--seed", "3", "--device", "cpu"]
    argv += ["--calibration-tasks", "2"]
    train(argv)
    model = MetaModel.load(out)
    record = model.config.task["calibration"]  # fitted on the training split, in the weights
    assert record["tasks_per_protocol"] == 2 and model.calibration is not None
    assert model.temperature == pytest.approx(record["temperature"], rel=1e-5)
    assert record["nll_fitted"] <= record["nll_at_1"] + 1e-9
    assert model.config.task["split"]["held_out_alphabets"] == sorted(omniglot.SMALL_HELD_OUT)
    assert model.config.training["seed"] == 3
    assert "--iterations 2" in model.config.training["command"]
    assert model.config.inner.learned_lr == "per_layer_per_step"
    assert float(model.params["head.weight"].abs().sum()) == 0.0  # adaptation starts at zero
    assert (out / "metrics.csv").read_text().count("\n") == 2  # header + one validation row
    train([*argv, "--resume"])  # already finished: resumes, trains nothing more
    assert MetaModel.load(out).version == model.version


@needs_data
def test_training_recipe_prototypical_stage_from_an_artifact(
    tmp_path: Path, small_dir: Path
) -> None:
    common = ["--data", str(small_dir), "--val-tasks", "1", "--channels", "8", "--device", "cpu"]
    common += ["--calibration-tasks", "0"]
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
def test_training_recipe_records_support_shifts_and_can_learn_rates_alone(
    tmp_path: Path, small_dir: Path
) -> None:
    common = ["--data", str(small_dir), "--val-tasks", "1", "--channels", "8", "--device", "cpu"]
    common += ["--calibration-tasks", "0"]
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


@needs_data
def test_a_budget_stops_at_a_checkpoint_and_resuming_gives_the_same_artifact(
    tmp_path: Path, small_dir: Path
) -> None:
    argv = ["--data", str(small_dir), "--val-tasks", "1", "--channels", "8", "--device", "cpu"]
    argv += ["--epochs", "0", "--iterations", "3", "--validate-every", "1", "--seed", "5"]
    argv += ["--calibration-tasks", "1", "--held-out", "Tagalog,Greek"]
    whole = tmp_path / "whole"
    train([*argv, "--out", str(whole)])
    parts = tmp_path / "parts"
    with pytest.raises(SystemExit) as stopped:  # a zero budget: stop at the first checkpoint
        train([*argv, "--out", str(parts), "--budget-minutes", "0"])
    assert stopped.value.code == omniglot.STOPPED
    assert not (parts / "config.json").exists() and (parts / "checkpoint").exists()
    train([*argv, "--out", str(parts), "--resume"])
    a, b = MetaModel.load(whole), MetaModel.load(parts)
    assert a.version == b.version and a.config.task["split"]["held_out_alphabets"] == [
        "Greek",
        "Tagalog",
    ]


# -- the held-out protocols ---------------------------------------------------------------
def drawer_of(split: omniglot.Split, cls: int, image: torch.Tensor) -> int:
    found = [d for d in range(20) if torch.equal(split.images[cls, d], image)]
    assert len(found) >= 1
    return found[0]


@needs_data
def test_within_alphabet_episodes_are_lake_runs_of_one_held_out_alphabet(
    data: omniglot.Omniglot,
) -> None:
    _, test = omniglot.split(data)
    g = torch.Generator().manual_seed(0)
    alphabets_seen = set()
    for _ in range(6):
        ep = omniglot.sample_within(g, test, 1, 20, 1, 3)
        assert ep.classes is not None
        classes = ep.classes[0].tolist()
        assert len(set(classes)) == 20
        alphabets = {test.names[c].split("/")[0] for c in classes}
        assert len(alphabets) == 1 and alphabets <= set(omniglot.HELD_OUT)
        alphabets_seen |= alphabets
        assert ep.xs.shape == (1, 20, 1, 28, 28) and ep.xq.shape == (1, 60, 1, 28, 28)
        assert ep.yq[0].tolist() == [c for c in range(20) for _ in range(3)]
        support = {drawer_of(test, c, ep.xs[0, i]) for i, c in enumerate(classes)}
        query = {drawer_of(test, classes[i // 3], ep.xq[0, i]) for i in range(60)}
        assert len(support) == 1 and len(query) == 3  # one drawer's support, three others'
        assert not support & query
    assert len(alphabets_seen) > 1
    with pytest.raises(ValueError, match="60 characters"):
        omniglot.sample_within(g, test, 1, 60, 1, 1)


@needs_data
@pytest.mark.skipif(not (ARTIFACT / "config.json").exists(), reason="artifact not shipped")
def test_eval_prints_both_protocols_with_ece_and_writes_the_diagram(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from models.evaluate import main

    diagram = tmp_path / "reliability.png"
    calibrated = tmp_path / "calibrated"
    argv = ["omniglot", "--artifact", str(ARTIFACT), "--data", str(DATA), "--held-out", "full"]
    argv += ["--tasks", "2", "--queries", "2", "--way", "5", "--shot", "1", "--within", "20"]
    argv += ["--fit-temperature", "1", "--save-calibrated", str(calibrated)]
    main([*argv, "--diagram", str(diagram)])
    out = capsys.readouterr().out
    assert "the artifact TRAINED on Balinese, Sanskrit" in out
    assert "| within | 20 | 1 |" in out and "| across | 5 | 1 |" in out
    assert "ECE at fitted T" in out
    image = Image.open(diagram)
    assert image.format == "PNG" and image.size == (2 * 260, 2 * 284)  # 2 rows x 2 panels
    model, shipped = MetaModel.load(calibrated), MetaModel.load(ARTIFACT)
    assert model.calibration is not None and model.version != shipped.version
    assert model.config.trained_for == shipped.config.trained_for  # the guardrails stay
    assert model.config.task["calibration"]["tasks_per_protocol"] == 1
