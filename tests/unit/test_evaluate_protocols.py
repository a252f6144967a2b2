"""`facepipe evaluate` on the template protocols: IJB 1:1 + 1:N (closed/open set), video set-to-set, and a
model on the generated protocol folders (`facepipe synth --protocols`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facepipe.cli import main

D = 16


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _identification_npz(path, subjects=16, noise=0.9, seed=0):
    """One gallery template per subject (G1 even, G2 odd), two probe templates per subject, 2 images each."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(subjects, D)))
    emb, tmpl, media, owner = [], [], [], {}
    for s in range(subjects):
        for k in range(3):
            tid = 3 * s + k + 1
            owner[tid] = s
            for i in range(2):
                emb.append(centres[s] + noise * rng.normal(size=D) / np.sqrt(D))
                tmpl.append(tid)
                media.append(10 * tid + i)
    g_t = np.array([3 * s + 1 for s in range(subjects)])
    p_t = np.array([3 * s + k + 1 for s in range(subjects) for k in (1, 2)])
    np.savez(
        path,
        embeddings=np.array(emb),
        templates=np.array(tmpl),
        medias=np.array(media),
        p1=np.concatenate([g_t, g_t]),
        p2=np.concatenate(
            [g_t + 1, np.roll(g_t + 1, 1)]
        ),  # a probe template of the same, then the next subject
        label=np.arange(2 * subjects) < subjects,
        gallery_templates=g_t,
        gallery_subjects=g_t // 3,
        gallery_sets=np.array(["G1" if s % 2 == 0 else "G2" for s in range(subjects)]),
        probe_templates=p_t,
        probe_subjects=p_t // 3 - (p_t % 3 == 0),
    )
    return np.array(emb), np.array(tmpl), owner


def _brute_force(emb, tmpl, owner, gallery_subjects, probe_tids, fpir):
    """Templates = unit(sum of media means); each probe searched by a loop over the gallery."""
    feats = {t: _unit(np.mean([emb[i] for i in np.flatnonzero(tmpl == t)], axis=0)) for t in np.unique(tmpl)}
    gallery = [(t, s) for t, s in owner.items() if t % 3 == 1 and s in gallery_subjects]
    hits, mated_scores, nonmated_top = [], [], []
    for p in probe_tids:
        scores = [(float(feats[p] @ feats[g]), s) for g, s in gallery]
        top, top_subject = max(scores)
        if owner[p] in gallery_subjects:
            hits.append(top_subject == owner[p])
            mated_scores.append((top_subject == owner[p], top))
        else:
            nonmated_top.append(top)
    nm = sorted(nonmated_top, reverse=True)
    thr = nm[int(np.floor(fpir * len(nm)))]
    tpir = np.mean([ok and s > thr for ok, s in mated_scores])
    return float(np.mean(hits)), float(tpir)


def test_templates_file_runs_1to1_and_1toN(tmp_path):
    emb, tmpl, owner = _identification_npz(tmp_path / "ijb.npz")
    out = tmp_path / "out"
    argv = ["evaluate", "--templates", str(tmp_path / "ijb.npz"), "--fpir", "0.1,0.5", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "tar_at_far_nearest" in metrics  # 1:1 still runs
    ident = metrics["identification"]
    probes = [3 * s + k + 1 for s in range(16) for k in (1, 2)]
    for g, subjects in (("G1", set(range(0, 16, 2))), ("G2", set(range(1, 16, 2)))):
        rank1, tpir = _brute_force(emb, tmpl, owner, subjects, probes, 0.5)
        entry = ident["galleries"][g]
        assert entry["n_mated_probes"] == 16 and entry["n_nonmated_probes"] == 16
        assert entry["closed_set"]["rank_1"] == pytest.approx(rank1)
        assert entry["open_set"]["5e-01"]["tpir"] == pytest.approx(tpir)
        assert entry["closed_set"]["rank_10"] == 1.0  # 8 gallery templates: every mate is within rank 8
    assert 0.3 < ident["closed_set"]["rank_1"] < 1.0  # noisy enough that rank 1 is not trivial
    files = {p.name for p in (out / "identification").iterdir()}
    assert files == {"metrics.json", "cmc.png", "det_identification.png"}
    assert {"roc.png", "det.png"} <= {p.name for p in out.iterdir()}


def test_protocols_flag_picks_what_runs(tmp_path, capsys):
    _identification_npz(tmp_path / "ijb.npz")
    out = tmp_path / "only1n"
    argv = ["evaluate", "--templates", str(tmp_path / "ijb.npz"), "--protocols", "1:N", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "tar_at_far_nearest" not in metrics and "identification" in metrics
    assert not (out / "roc.png").exists()
    data = dict(np.load(tmp_path / "ijb.npz"))
    del data["probe_templates"]
    np.savez(tmp_path / "no1n.npz", **data)
    argv = ["evaluate", "--templates", str(tmp_path / "no1n.npz"), "--protocols", "1:N", "--out", str(out)]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "no1n.npz" in err and "probe_templates" in err and "Traceback" not in err


def _video_npz(path, videos=24, frames=8, seed=1):
    """Videos of 12 identities; all but one frame of each video are noise, flagged by a large σ²."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(videos // 2, D)))
    emb, vid, unc = [], [], []
    for v in range(videos):
        for f in range(frames):
            bad = f >= 1  # one clean frame per video
            emb.append(
                rng.normal(size=D) * 2 if bad else centres[v // 2] + 0.3 * rng.normal(size=D) / np.sqrt(D)
            )
            vid.append(v)
            unc.append([5.0 if bad else 0.05])
    a = np.arange(0, videos, 2)
    b = np.concatenate([a + 1, (a + 3) % videos])  # same identity, then the next identity's video
    np.savez(
        path,
        embeddings=np.array(emb),
        videos=np.array(vid),
        uncertainty=np.array(unc),
        kind=np.array("sigma_sq"),
        video_a=np.concatenate([a, a]),
        video_b=b,
        issame=np.arange(2 * a.size) < a.size,
    )
    return np.array(emb), np.array(vid), np.concatenate([a, a]), b, np.arange(2 * a.size) < a.size


def test_video_mean_and_each_methods_own_fusion(tmp_path):
    from sklearn.metrics import roc_auc_score

    emb, vid, va, vb, same = _video_npz(tmp_path / "ytf.npz")
    out = tmp_path / "video"
    assert main(["evaluate", "--video", str(tmp_path / "ytf.npz"), "--folds", "4", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    fusions = metrics["fusions"]
    assert "mean" in fusions and "probface" in fusions  # one σ² column per frame: ProbFace's own fusion
    tmpl = {v: _unit(_unit(emb[vid == v]).mean(axis=0)) for v in np.unique(vid)}
    cos = np.array([tmpl[a] @ tmpl[b] for a, b in zip(va, vb, strict=True)])
    assert fusions["mean"]["auc"] == pytest.approx(roc_auc_score(same, cos), abs=1e-9)
    # the uncertainty-weighted fusion ignores the noise frames; the plain mean cannot
    assert fusions["probface"]["auc"] > fusions["mean"]["auc"]
    assert fusions["probface"]["accuracy"] > 0.9
    assert {"metrics.json", "roc.png", "det.png"} == {p.name for p in out.iterdir()}


@pytest.fixture(scope="module")
def synth_protocols(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthp")
    argv = [
        "synth",
        str(root),
        "--protocols",
        "ijb,video",
        "--protocols-only",
        "--protocol-subjects",
        "4",
        "--size",
        "64",
    ]
    assert main(argv) == 0
    return root


def test_synth_writes_release_layouts_the_readers_take(synth_protocols):
    root = synth_protocols
    meta = root / "ijb" / "meta"
    for name in ("ijbc_face_tid_mid.txt", "ijbc_name_5pts_score.txt", "ijbc_template_pair_label.txt"):
        assert (meta / name).is_file()
    assert (meta / "ijbc_1N_probe_mixed.csv").read_text().startswith("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
    info = json.loads((root / "protocols" / "ijb" / "protocol.json").read_text())
    assert info["kind"] == "ijb" and info["templates"] == 12 and info["gallery_templates"] == 4
    video = json.loads((root / "protocols" / "video" / "protocol.json").read_text())
    assert video["kind"] == "video" and video["videos"] == 8 and video["pairs"] == 8
    import pyarrow.parquet as pq

    frames = pq.read_table(root / "protocols" / "video" / "frames.parquet")
    assert frames.num_rows == 64 and set(frames.column("video").to_pylist()) == set(range(8))


def test_model_on_generated_ijb_and_video_protocols(synth_protocols, tmp_path):
    from tests.unit.test_evaluate_model import _bundle

    model = _bundle(tmp_path / "model", "probface")
    out = tmp_path / "ijb"
    argv = [
        "evaluate", "--model", str(model), "--protocol", str(synth_protocols / "protocols" / "ijb"),
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_templates"] == 12 and "tar_at_far_nearest" in metrics
    assert set(metrics["identification"]["galleries"]) == {"G1", "G2"}
    feats = np.load(out / "features.npz")
    assert feats["embeddings"].shape[0] == feats["templates"].shape[0] and "uncertainty" in feats
    out = tmp_path / "video"
    argv = [
        "evaluate", "--model", str(model), "--protocol", str(synth_protocols / "protocols" / "video"),
        "--folds", "2", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    assert set(json.loads((out / "metrics.json").read_text())["fusions"]) == {"mean", "probface"}


def test_protocol_command_reads_lfw_and_reports_bad_lines(faces_dir, tmp_path, capsys):
    root = tmp_path / "lfw" / "Anthony_Hopkins"
    root.mkdir(parents=True)
    for i in (1, 2):
        (root / f"Anthony_Hopkins_000{i}.jpg").write_bytes(
            (faces_dir / "images" / "lfw" / f"Anthony_Hopkins_000{i}.jpg").read_bytes()
        )
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\t1\nAnthony_Hopkins\t1\t2\nAnthony_Hopkins\t1\tAnthony_Hopkins\t2\n")
    argv = ["protocol", "lfw", str(tmp_path / "lfw"), str(tmp_path / "out"), "--pairs", str(pairs)]
    argv += ["--landmarks", str(faces_dir / "lfw" / "lfw_landmark.txt")]
    assert main(argv) == 0
    assert "2 of 2 listed" in capsys.readouterr().out
    assert (tmp_path / "out" / "pairs" / "pairs.parquet").is_file()
    pairs.write_text("1\t1\nAnthony_Hopkins\t1\t2\nAnthony_Hopkins\t1\tAnthony_Hopkins\n")
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(pairs) in err and "record 3" in err


def test_identification_det_matches_a_threshold_loop():
    from facepipe.eval.identification import search
    from facepipe.eval.protocol_report import identification_det

    rng = np.random.default_rng(3)
    gallery = _unit(rng.normal(size=(6, D)))
    probe_ids = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])  # 6.. are not enrolled
    probes = _unit(
        np.vstack([gallery, rng.normal(size=(4, D))]) + 0.8 * rng.normal(size=(10, D)) / np.sqrt(D)
    )
    res = search(probes, probe_ids, gallery, np.arange(6))
    fpir, fnir = identification_det(res)
    nm = np.sort(res.top_score[~res.mated])[::-1]
    for k, t in enumerate(nm):
        hit = [(res.rank[i] == 1) and (res.mate_score[i] > t) for i in np.flatnonzero(res.mated)]
        assert fpir[k] == pytest.approx(np.mean(nm > t))
        assert fnir[k] == pytest.approx(1.0 - np.mean(hit))


def test_identification_det_with_no_errors_still_draws(tmp_path):
    """A perfect open-set search (FNIR 0 everywhere) has nothing for a log axis: the plot is still written."""
    from facepipe.eval.protocol_report import plot_identification_det

    curves = {"perfect": (np.array([0.0, 0.1, 0.5]), np.zeros(3))}
    path = plot_identification_det(curves, tmp_path / "det.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
