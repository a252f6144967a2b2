"""The generated sample dataset: layout, determinism, sidecars, difficulty and relatives."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from facepipe.cli import main
from facepipe.data.formats.insightface import open_training_set
from facepipe.data.formats.recordio import IndexedRecordFile, header_label, unpack
from facepipe.data.formats.verification_bin import load_bin
from facepipe.data.synth import baselines as SB
from facepipe.data.synth import generate as S
from facepipe.data.synth import render as sr

IDS, IMGS, PAIRS = 6, 3, 20


SMALL_SAME_AS_CLI = S.SynthConfig(identities=IDS, images_per_identity=IMGS, pairs=PAIRS, seed=7)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    argv = ["synth", str(out), "--identities", str(IDS), "--images-per-identity", str(IMGS)]
    # --protocols "": only the dataset, whatever the synth section of ./params.yaml asks for
    assert main([*argv, "--pairs", str(PAIRS), "--seed", "7", "--workers", "1", "--protocols", ""]) == 0
    return out


def test_writes_every_file(dataset: Path) -> None:
    names = {p.name for p in dataset.iterdir()}
    expected = {
        "train.rec",
        "train.idx",
        "property",
        "degradation.parquet",
        "synth_manifest.json",
        "samples.png",
    }
    for spec in S.SynthConfig().pair_sets:
        expected |= {f"{spec.name}.bin", f"{spec.name}.degradation.parquet"}
    assert expected <= names
    assert not [n for n in names if n.endswith(".tmp")]
    manifest = json.loads((dataset / "synth_manifest.json").read_text())
    assert manifest["seed"] == 7
    assert manifest["train"] == {**manifest["train"], "classes": IDS, "images": IDS * IMGS}
    for info in manifest["verification"].values():
        assert info["pairs"] == PAIRS
        assert {"pixel_cosine_acc", "hog_cosine_acc"} <= set(info["baselines"])
    png = cv2.imread(str(dataset / "samples.png"))
    assert png is not None and png.shape[0] > 200


def test_insightface_layout_reads_back(dataset: Path) -> None:
    ts = open_training_set(dataset)
    assert ts.layout == "header" and ts.label_convention == "scalar"
    assert ts.num_classes == IDS and ts.image_size == (112, 112)
    assert list(ts.image_keys) == list(range(1, IDS * IMGS + 1))
    assert list(ts.identity_ends - ts.identity_starts) == [IMGS] * IDS
    with IndexedRecordFile(dataset / "train.rec", dataset / "train.idx") as rec:
        for key in (1, IMGS + 1, IDS * IMGS):
            header, payload = unpack(rec.read(key))
            assert header_label(header) == (key - 1) // IMGS
            img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
            assert img.shape == (112, 112, 3)
    for spec in S.SynthConfig().pair_sets:
        images, issame = load_bin(dataset / f"{spec.name}.bin")
        assert len(images) == 2 * PAIRS and len(issame) == PAIRS
        assert sum(issame) == PAIRS // 2
        side = pq.read_table(dataset / f"{spec.name}.degradation.parquet").to_pydict()
        assert side["pair"] == list(range(PAIRS)) and side["issame"] == issame
        assert all(0 <= d <= 1 for d in side["degradation_a"] + side["degradation_b"])


def test_degradation_sidecar_covers_every_key(dataset: Path) -> None:
    table = pq.read_table(dataset / "degradation.parquet")
    assert str(table.schema.field("key").type) == "int64"
    assert str(table.schema.field("label").type) == "int64"
    assert str(table.schema.field("degradation").type) == "float"
    rows = table.to_pydict()
    assert rows["key"] == list(range(1, IDS * IMGS + 1))
    assert rows["label"] == [(k - 1) // IMGS for k in rows["key"]]
    assert all(0.0 <= d <= 1.0 for d in rows["degradation"])
    assert {"yaw", "roll", "blur_sigma", "jpeg_quality", "occlusions"} <= set(rows)


def test_same_seed_same_bytes_any_worker_count(dataset: Path, tmp_path: Path) -> None:
    cfg = SMALL_SAME_AS_CLI
    S.generate(tmp_path / "again", cfg, workers=2)
    for name in ("train.rec", "train.idx", "property", "synth_val.bin", "synth_hard.bin"):
        assert (tmp_path / "again" / name).read_bytes() == (dataset / name).read_bytes(), name
    other = S.render_identity_images(
        S.SynthConfig(identities=IDS, images_per_identity=IMGS, pairs=PAIRS, seed=8), 0
    )
    assert other[0][0] != S.render_identity_images(cfg, 0)[0][0]


def test_resumes_after_finished_stages(dataset: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    train_mtime = (copy / "train.rec").stat().st_mtime_ns
    (copy / "synth_hard.bin").unlink()  # as if killed while writing the last set
    (copy / "synth_manifest.json").unlink()
    S.generate(copy, SMALL_SAME_AS_CLI)
    assert (copy / "train.rec").stat().st_mtime_ns == train_mtime  # kept, not re-rendered
    assert (copy / "synth_hard.bin").read_bytes() == (dataset / "synth_hard.bin").read_bytes()
    again = S.generate(copy, SMALL_SAME_AS_CLI)  # finished: returns the manifest, writes nothing
    assert again == json.loads((copy / "synth_manifest.json").read_text())
    other = S.SynthConfig(identities=IDS, images_per_identity=IMGS, pairs=PAIRS, seed=8)
    assert S._load_state(copy, other)["stages"] == {}  # another config never reuses a stage


def test_relatives_differ_only_in_redrawn_groups() -> None:
    rng = np.random.default_rng(3)
    for n_groups in (1, 2, 3, 5):
        parent = sr.sample_identity(rng)
        child = sr.make_relative(parent, rng, n_groups, parent=0)
        assert len(child.redrawn) == n_groups
        assert len(set(child.redrawn) & set(sr.STRUCTURAL)) >= min(n_groups, 2)
        for group in sr.GROUPS:
            if group in child.redrawn:
                assert child.params[group] != parent.params[group], group
            else:
                assert child.params[group] == parent.params[group], group
        for group in sr.GROUPS:
            assert np.isfinite(sr._group_distance(parent.params[group], child.params[group]))
    # training families: a relative keeps its founder's hair, skin and extras
    cfg = S.SynthConfig(identities=40, pairs=20, seed=1, relative_fraction=0.5)
    relatives = [i for i in range(cfg.identities) if S.training_identity(cfg, i).parent is not None]
    assert relatives
    for i in relatives:
        child = S.training_identity(cfg, i)
        founder = S.training_identity(cfg, child.parent)
        assert founder.parent is None and child.parent < i
        kept = [g for g in sr.GROUPS if g not in child.redrawn]
        assert all(child.params[g] == founder.params[g] for g in kept)


def test_degradation_drives_damage() -> None:
    rng = np.random.default_rng(0)
    clean = sr.sample_nuisance(rng, 0.0)
    assert clean.blur_sigma == 0 and clean.occlusions == 0 and clean.noise_sigma == 0
    assert clean.jpeg_quality == 95 and clean.downscale == 1.0
    worst = [sr.sample_nuisance(rng, 1.0) for _ in range(20)]
    assert all(n.blur_sigma > 2 and n.jpeg_quality < 40 and n.downscale < 0.35 for n in worst)
    assert np.mean([n.occlusions for n in worst]) > 1
    # capture quality: pose and lighting stray further from a frontal, evenly lit shot as the level rises
    calm = [sr.sample_nuisance(rng, 0.0) for _ in range(200)]
    wild = [sr.sample_nuisance(rng, 1.0) for _ in range(200)]
    for name in ("yaw", "pitch", "roll", "brightness"):
        spread_calm = np.abs([getattr(n, name) for n in calm]).mean()
        spread_wild = np.abs([getattr(n, name) for n in wild]).mean()
        assert spread_wild > 2.5 * spread_calm, name
    assert np.mean([n.light_strength for n in wild]) > 2.5 * np.mean([n.light_strength for n in calm])
    with pytest.raises(ValueError):
        sr.make_relative(sr.sample_identity(rng), rng, 0)


def test_ten_fold_accuracy() -> None:
    issame = np.arange(200) % 2 == 0
    assert SB.ten_fold_accuracy(np.where(issame, 0.9, 0.1), issame) == 1.0
    assert SB.ten_fold_accuracy(np.where(issame, 0.1, 0.9), issame) == 0.5  # "same" means a higher score
    noise = np.random.default_rng(0).random(200)
    assert 0.35 < SB.ten_fold_accuracy(noise, issame) < 0.65
    t, acc = SB.best_threshold(np.array([0.1, 0.2, 0.3, 0.4]), np.array([False, True, False, True]))
    assert acc == 0.75 and 0.1 <= t < 0.4


def test_baselines_within_limits() -> None:
    cfg = S.SynthConfig(identities=10, pairs=240, seed=11)
    pair_set = S.build_pair_set(cfg, 0)
    base = S.baselines(pair_set)
    assert base["pixel_cosine_acc"] <= 0.70
    assert base["hog_cosine_acc"] <= 0.80
    # the feature code itself works: an image against itself scores a perfect match
    same = S.PairSet("self", [pair_set.images[0]] * 2 + pair_set.images[:2], [True, False], pair_set.rows[:2])
    grey = SB.decode_grey(same.images)
    assert SB.pair_cosine(SB.pixel_features(grey))[0] == pytest.approx(1.0)
    assert SB.pair_cosine(SB.hog_features(grey))[0] == pytest.approx(1.0)


def test_bad_flags_are_user_errors(tmp_path: Path, capsys) -> None:
    assert main(["synth", str(tmp_path / "x"), "--pairs", "7"]) == 2
    assert "pairs must be an even number" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
