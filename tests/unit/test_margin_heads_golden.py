"""Margin heads against the authors' own outputs (golden cases 01-04, tolerances from the fixture README).

Every comparison records its largest absolute error in ``MAX_ERRORS``; the last test prints the table
(run with ``-s`` to see it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facepipe.models.heads import (
    AdaFace,
    ASoftmax,
    CurricularFace,
    OpenSphereFace,
    SphereFace2,
    arcface_logits,
    combined_margin_logits,
    cosface_logits,
    insightface_combined_logits,
)
from facepipe.models.heads.sphereface import (
    LAMBDA_SCHEDULES,
    a_softmax_logits,
    annealed_lambda,
    psi_chebyshev,
    psi_taylor,
    sphereface2_bias_init,
)
from facepipe.models.losses import cross_entropy, dist_cross_entropy
from tests.fixture_dirs import missing_fixture

pytestmark = pytest.mark.golden

DTYPES = {"f32": torch.float32, "f64": torch.float64}
LOGIT_ATOL = {"f32": 1e-4, "f64": 1e-8}
BUFFER_RTOL = {"f32": 1e-6, "f64": 1e-12}
MAX_ERRORS: dict[str, float] = {}


def _case(golden_dir: Path, prefix: str) -> dict[str, np.ndarray]:
    matches = sorted(golden_dir.glob(f"{prefix}_*.npz"))
    if not matches:
        missing_fixture(f"no {prefix}_*.npz in {golden_dir}")
    with np.load(matches[0], allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _params(case: dict[str, np.ndarray]) -> dict:
    return json.loads(str(case["meta_json"]))["params"] if "meta_json" in case else {}


def _check(name: str, got: torch.Tensor | float, want: np.ndarray, atol: float = 0.0, rtol: float = 0.0):
    got_np = got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    want = np.asarray(want)
    assert got_np.shape == want.shape or got_np.size == want.size, (name, got_np.shape, want.shape)
    got_np = got_np.reshape(want.shape).astype(np.float64)
    err = float(np.max(np.abs(got_np - want))) if want.size else 0.0
    MAX_ERRORS[name] = max(MAX_ERRORS.get(name, 0.0), err)
    np.testing.assert_allclose(got_np, want, atol=atol, rtol=rtol, err_msg=name)


# ---------------------------------------------------------------- case 01: ArcFace / CosFace / combined


def _case01_runs(case: dict[str, np.ndarray]) -> dict[str, object]:
    """Maps each reference run name in the npz to our functional form (parameters from the case json)."""
    p = _params(case)
    s, am, cm = float(p.get("s", 64.0)), float(p.get("arcface_m", 0.5)), float(p.get("cosface_m", 0.4))
    runs: dict[str, object] = {}
    for key in case:
        m = re.match(r"^(.*)__logits_f32$", key)
        if not m:
            continue
        name = m.group(1)
        if name == "arcface_head":
            runs[name] = lambda c, y: arcface_logits(c, y, s, am, form="head")
        elif name == "arcface_2022":
            runs[name] = lambda c, y: arcface_logits(c, y, s, am, form="legacy")
        elif name == "arcface_2022_easy_margin":
            runs[name] = lambda c, y: arcface_logits(c, y, s, am, form="legacy", easy_margin=True)
        elif name == "cosface_head":
            runs[name] = lambda c, y: cosface_logits(c, y, s, cm)
        elif name == "combined_head_arc":
            runs[name] = lambda c, y: insightface_combined_logits(c, y, s, 1.0, am, 0.0)
        elif name == "combined_head_cos":
            runs[name] = lambda c, y: insightface_combined_logits(c, y, s, 1.0, 0.0, cm)
        elif name == "combined_2022_arc":
            runs[name] = lambda c, y: insightface_combined_logits(c, y, s, 1.0, am, 0.0, form="legacy")
        elif name.startswith("combined_head_arc_filter"):
            thr = float(name.split("filter")[1])
            runs[name] = lambda c, y, t=thr: insightface_combined_logits(c, y, s, 1.0, am, 0.0, t)
        elif name.startswith("combined_head_cos_filter"):
            thr = float(name.split("filter")[1])
            runs[name] = lambda c, y, t=thr: insightface_combined_logits(c, y, s, 1.0, 0.0, cm, t)
        elif (mm := re.match(r"combined_head_m1_([\d.]+)_m2_([\d.]+)_m3_([\d.]+)$", name)) is not None:
            m1, m2, m3 = (float(v) for v in mm.groups())
            runs[name] = lambda c, y, a=m1, b=m2, d=m3: insightface_combined_logits(c, y, s, a, b, d)
        else:
            raise AssertionError(f"unknown case01 run {name}: extend the mapping")
    return runs


def test_case01_margin_logits(golden_dir):
    case = _case(golden_dir, "case01")
    runs = _case01_runs(case)
    assert len(runs) >= 9
    for name, fn in runs.items():
        for tag, dtype in DTYPES.items():
            cos = torch.from_numpy(case["cos"]).to(dtype)
            labels = torch.from_numpy(case["labels"]).reshape(-1, 1)
            before = cos.clone()
            logits = fn(cos, labels)
            assert torch.equal(cos, before), "our heads must not modify their input"
            key = f"{name}__logits_{tag}"
            if key in case:
                _check(f"case01 {key}", logits, case[key], atol=LOGIT_ATOL[tag])
            ce_key = f"{name}__ce_{tag}"
            if ce_key in case:
                _check(f"case01 {ce_key}", cross_entropy(logits, labels), case[ce_key], rtol=1e-5)
            distce_key = f"{name}__distce_{tag}"
            if distce_key in case:
                _check(
                    f"case01 {distce_key}", dist_cross_entropy(logits, labels), case[distce_key], rtol=1e-5
                )
            neg_key = f"{name}__logits_labelneg_{tag}"
            if neg_key in case:
                neg = torch.from_numpy(case["labels_neg"]).reshape(-1, 1)
                _check(f"case01 {neg_key}", fn(cos, neg), case[neg_key], atol=LOGIT_ATOL[tag])


def test_case01_true_combined_margin(golden_dir):
    case = _case(golden_dir, "case01")
    keys = [k for k in case if k.startswith("mxnet_combined_") and "__logits_" in k]
    assert keys
    for key in keys:
        m1, m2, m3 = (
            float(v) for v in re.match(r"mxnet_combined_m1_([\d.]+)_m2_([\d.]+)_m3_([\d.]+)__", key).groups()
        )
        tag = key.rsplit("_", 1)[1]
        cos = torch.from_numpy(case["cos"]).to(DTYPES[tag])
        labels = torch.from_numpy(case["labels"])
        logits = combined_margin_logits(cos, labels, float(_params(case).get("s", 64.0)), m1, m2, m3)
        _check(f"case01 {key}", logits, case[key], atol=LOGIT_ATOL[tag])
        ce_key = key.replace("__logits_", "__ce_")
        if ce_key in case:
            _check(f"case01 {ce_key}", cross_entropy(logits, labels), case[ce_key], rtol=1e-5)


def test_case01_distce_differs_from_ce_as_documented(golden_dir):
    """The 1e-30 clamp caps a row's loss at 69.08, so with s=64 the float32 DistCE < plain CE."""
    case = _case(golden_dir, "case01")
    cos = torch.from_numpy(case["cos"])
    labels = torch.from_numpy(case["labels"])
    logits = arcface_logits(cos, labels, 64.0, 0.5, form="head")
    assert float(dist_cross_entropy(logits, labels)) < float(cross_entropy(logits, labels)) - 1.0


# ---------------------------------------------------------------- case 02: AdaFace


@pytest.mark.parametrize("tag", ["f32", "f64"])
def test_case02_adaface(golden_dir, tag):
    case = _case(golden_dir, "case02")
    p = _params(case) or {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01, "eps": 1e-3}
    dtype = DTYPES[tag]
    kernel = torch.from_numpy(case["kernel_init"])  # (D, C)
    head = AdaFace(
        kernel.shape[0],
        kernel.shape[1],
        s=p.get("s", 64.0),
        m=p.get("m", 0.4),
        h=p.get("h", 0.333),
        t_alpha=p.get("t_alpha", 0.01),
        eps=p.get("eps", 1e-3),
        init_batch_mean=p.get("init_batch_mean", 20.0),
        init_batch_std=p.get("init_batch_std", 100.0),
    ).to(dtype)
    with torch.no_grad():
        head.weight.copy_(kernel.t())
    n_calls = sum(1 for k in case if re.match(r"call\d+__embeddings$", k))
    assert n_calls >= 1
    for i in range(n_calls):
        emb = torch.from_numpy(case[f"call{i}__embeddings"]).to(dtype)
        norms = torch.from_numpy(case[f"call{i}__norms"]).to(dtype)
        labels = torch.from_numpy(case[f"call{i}__labels"])
        logits = head(emb, labels, norms=norms)
        _check(f"case02 call{i}__logits_{tag}", logits, case[f"call{i}__logits_{tag}"], atol=LOGIT_ATOL[tag])
        _check(
            f"case02 call{i}__ce_{tag}",
            F.cross_entropy(logits, labels),
            case[f"call{i}__ce_{tag}"],
            rtol=1e-5,
        )
        for buf in ("batch_mean", "batch_std"):
            key = f"call{i}__{buf}_after_{tag}"
            _check(f"case02 {key}", getattr(head, buf), case[key], rtol=BUFFER_RTOL[tag])


# ---------------------------------------------------------------- case 03: SphereFace family


def _clcarwin_cos_norms(case, dtype):
    x = torch.from_numpy(case["clcarwin__x"]).to(dtype)
    w = torch.from_numpy(case["clcarwin__weight"]).to(dtype)  # (D, C)
    norms = x.norm(dim=1, keepdim=True)
    cos = (x @ F.normalize(w, dim=0) / norms).clamp(-1, 1)
    return cos, norms


@pytest.mark.parametrize("tag", ["f32", "f64"])
@pytest.mark.parametrize("phiflag", [0, 1])
def test_case03_clcarwin_a_softmax(golden_dir, tag, phiflag):
    case = _case(golden_dir, "case03")
    dtype = DTYPES[tag]
    pre = f"clcarwin_phiflag{phiflag}__"
    cos, norms = _clcarwin_cos_norms(case, dtype)
    psi = psi_chebyshev(cos, 4) if phiflag else psi_taylor(cos, 4)
    _check(
        f"case03 {pre}cos_theta_times_xlen_{tag}",
        cos * norms,
        case[f"{pre}cos_theta_times_xlen_{tag}"],
        atol=LOGIT_ATOL[tag],
    )
    _check(
        f"case03 {pre}phi_theta_times_xlen_{tag}",
        psi * norms,
        case[f"{pre}phi_theta_times_xlen_{tag}"],
        atol=LOGIT_ATOL[tag],
    )

    labels = torch.from_numpy(case["labels"])
    clc = _params(case).get("clcarwin", {})
    head = ASoftmax(
        m=int(clc.get("m", 4)),
        schedule="clcarwin",
        phi="chebyshev" if phiflag else "taylor",
        base=clc.get("LambdaMax"),
        lambda_min=clc.get("LambdaMin"),
    )
    head = head.to(dtype).train()
    its = case[f"{pre}angleloss_it_{tag}"]
    for j, it in enumerate(its):
        head.it.fill_(int(it) - 1)  # the counter advances before use
        logits = head.margin(cos, labels, norms)
        assert int(head.it) == int(it)
        _check(
            f"case03 {pre}angleloss_lambda_{tag}",
            head.current_lambda,
            case[f"{pre}angleloss_lambda_{tag}"][j],
        )
        _check(
            f"case03 {pre}angleloss_logits_{tag}",
            logits,
            case[f"{pre}angleloss_logits_{tag}"][j],
            atol=LOGIT_ATOL[tag],
        )
        _check(
            f"case03 {pre}angleloss_loss_{tag}",
            F.cross_entropy(logits, labels),
            case[f"{pre}angleloss_loss_{tag}"][j],
            rtol=1e-6 if tag == "f64" else 1e-5,
        )
    # focal variant at it=1: (1-pt)^γ · (−log pt), γ=2
    key = f"{pre}angleloss_gamma2_it1_loss_{tag}"
    if key in case:
        lam = annealed_lambda(1, **LAMBDA_SCHEDULES["clcarwin"])
        logits = a_softmax_logits(cos, labels, norms, lam, 4, "chebyshev" if phiflag else "taylor")
        logpt = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).reshape(-1)
        focal = (-((1 - logpt.exp()) ** 2) * logpt).mean()
        _check(f"case03 {key}", focal, case[key], rtol=1e-6 if tag == "f64" else 1e-5)


def test_case03_caffe_quadruple(golden_dir):
    case = _case(golden_dir, "case03")
    cos, norms = _clcarwin_cos_norms(case, torch.float64)
    labels = torch.from_numpy(case["labels"])
    caffe = {
        k: v
        for k, v in _params(case).get("caffe", {}).items()
        if k in ("base", "gamma", "power", "lambda_min")
    }
    head = ASoftmax(m=4, schedule="caffe", **caffe).double().train()
    for j, it in enumerate(case["caffe_quadruple__iters"]):
        head.it.fill_(int(it) - 1)
        logits = head.margin(cos, labels, norms)
        _check(
            "case03 caffe_quadruple__lambda_f64", head.current_lambda, case["caffe_quadruple__lambda_f64"][j]
        )
        _check(
            "case03 caffe_quadruple__logits_f64", logits, case["caffe_quadruple__logits_f64"][j], atol=1e-8
        )
        _check(
            "case03 caffe_quadruple__ce_f64",
            F.cross_entropy(logits, labels),
            case["caffe_quadruple__ce_f64"][j],
            rtol=1e-6,
        )


@pytest.mark.parametrize("tag", ["f32", "f64"])
def test_case03_opensphere(golden_dir, tag):
    case = _case(golden_dir, "case03")
    dtype = DTYPES[tag]
    x = torch.from_numpy(case["opensphere__x"]).to(dtype)
    labels = torch.from_numpy(case["labels"])
    p = _params(case)
    sf_p = p.get("opensphere_sphereface", {"s": 64.0, "m": 1.7})
    w = torch.from_numpy(case["opensphere_sphereface__w_init"])
    head = OpenSphereFace(w.shape[1], w.shape[0], s=sf_p["s"], m=sf_p["m"]).to(dtype)
    with torch.no_grad():
        head.weight.copy_(w)
    logits = head(x, labels)
    _check(
        f"case03 opensphere_sphereface__logits_{tag}",
        logits,
        case[f"opensphere_sphereface__logits_{tag}"],
        atol=LOGIT_ATOL[tag],
    )
    _check(
        f"case03 opensphere_sphereface__loss_{tag}",
        head.loss(x, labels),
        case[f"opensphere_sphereface__loss_{tag}"],
        rtol=1e-6 if tag == "f64" else 1e-5,
    )

    s2_p = p.get("opensphere_sphereface2", {"alpha": 0.8, "r": 64.0, "m": 0.5, "t": 3.0, "lw": 50.0})
    w2 = torch.from_numpy(case["opensphere_sphereface2__w_init"])
    head2 = SphereFace2(w2.shape[1], w2.shape[0], **s2_p).to(dtype)
    _check(
        "case03 opensphere_sphereface2__b_init", head2.bias, case["opensphere_sphereface2__b_init"], rtol=1e-6
    )
    assert sphereface2_bias_init(
        w2.shape[0], **{k: s2_p[k] for k in ("alpha", "r", "m", "t")}
    ) == pytest.approx(float(case["opensphere_sphereface2__b_init"][0]), rel=1e-6)
    with torch.no_grad():
        head2.weight.copy_(w2)
        head2.bias.copy_(torch.from_numpy(case["opensphere_sphereface2__b_init"]).to(dtype))
    logits2 = head2(x, labels)
    _check(
        f"case03 opensphere_sphereface2__logits_{tag}",
        logits2,
        case[f"opensphere_sphereface2__logits_{tag}"],
        atol=LOGIT_ATOL[tag],
    )
    one_hot = F.one_hot(labels, w2.shape[0]).to(dtype)
    _check(
        "case03 opensphere_sphereface2__bce_weight_f64",
        head2.bce_weight(one_hot),
        case["opensphere_sphereface2__bce_weight_f64"],
        rtol=1e-12,
    )
    _check(
        f"case03 opensphere_sphereface2__loss_{tag}",
        head2.logits_loss(logits2, labels),
        case[f"opensphere_sphereface2__loss_{tag}"],
        rtol=1e-6 if tag == "f64" else 1e-5,
    )


# ---------------------------------------------------------------- case 04: CurricularFace


@pytest.mark.parametrize("tag", ["f32", "f64"])
def test_case04_curricularface(golden_dir, tag):
    case = _case(golden_dir, "case04")
    p = _params(case) or {"scale": 64.0, "margin": 0.5, "alpha": 0.1}
    dtype = DTYPES[tag]
    kernel = torch.from_numpy(case["kernel_init"])
    head = CurricularFace(kernel.shape[0], kernel.shape[1], s=p["scale"], m=p["margin"], alpha=p["alpha"]).to(
        dtype
    )
    with torch.no_grad():
        head.weight.copy_(kernel.t())
        head.t.fill_(p.get("t_init", 0.0))
    n_calls = sum(1 for k in case if re.match(r"call\d+__embeddings$", k))
    assert n_calls >= 1
    for i in range(n_calls):
        emb = torch.from_numpy(case[f"call{i}__embeddings"]).to(dtype)
        labels = torch.from_numpy(case[f"call{i}__labels"])
        cos, _ = head.cosine(emb)
        _check(
            f"case04 call{i}__origin_cos_times_scale_{tag}",
            cos * head.s,
            case[f"call{i}__origin_cos_times_scale_{tag}"],
            atol=LOGIT_ATOL[tag],
        )
        logits = head(emb, labels)
        _check(f"case04 call{i}__logits_{tag}", logits, case[f"call{i}__logits_{tag}"], atol=LOGIT_ATOL[tag])
        _check(f"case04 call{i}__t_after_{tag}", head.t, case[f"call{i}__t_after_{tag}"], rtol=1e-6)
        _check(
            f"case04 call{i}__ce_{tag}",
            F.cross_entropy(logits, labels),
            case[f"call{i}__ce_{tag}"],
            rtol=1e-5,
        )


def test_zz_print_largest_errors():
    """Prints the largest absolute error per golden output (collected by the tests above)."""
    if not MAX_ERRORS:
        pytest.skip("no golden comparisons ran")
    groups: dict[str, float] = {}
    for name, err in MAX_ERRORS.items():
        case = name.split()[0]
        kind = re.sub(r"call\d+__", "", name.split()[1])
        kind = re.sub(r"^.*__", "", kind)
        key = f"{case} {kind}"
        groups[key] = max(groups.get(key, 0.0), err)
    print("\nlargest absolute error per case and output:")
    for key in sorted(groups):
        print(f"  {key:45s} {groups[key]:.3e}")
