"""Export a backbone, or a backbone with its uncertainty head, for inference outside facepipe.

Formats:
- ``onnx`` (opset 17 by default): image batch → embedding, or → (embedding, σ²/κ); the batch dimension is
  dynamic. Written with torch's TorchScript-based ONNX exporter (the newer torch.export-based one needs the
  ``onnxscript`` package, which this project does not install).
- ``torchscript``: a traced module, for ops ONNX cannot express.
Every file is written atomically, and ``verify_export`` runs it (onnxruntime / torch.jit) against eager.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import numpy as np
import torch
from torch import Tensor, nn

from facepipe.errors import FacepipeError
from facepipe.fsutil import atomic_path
from facepipe.models.bundle import find_bundle, load_bundle
from facepipe.uncertainty.head_io import HEAD_META, load_head
from facepipe.uncertainty.registry import EmbeddingWithUncertainty, get_method

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
DEFAULT_OPSET = 17
METADATA_FILE = "facepipe.json"


class EmbeddingOnly(nn.Module):
    """A backbone as an image → embedding module (whatever its ``forward`` returns otherwise)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        embedding, _ = self.backbone.forward_features(images)
        return embedding


def _output_names(model: nn.Module, example: Tensor) -> list[str]:
    with torch.no_grad():
        out = model(example)
    if isinstance(out, tuple | list):
        return (
            ["embedding", "uncertainty"][: len(out)]
            if len(out) <= 2
            else [f"output{i}" for i in range(len(out))]
        )
    return ["embedding"]


def export_model(
    model: nn.Module,
    example: Tensor,
    out_path: str | os.PathLike,
    *,
    fmt: Format = "onnx",
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, object] | None = None,
) -> Path:
    """Export ``model`` (switched to eval mode) traced on ``example`` (N, 3, H, W) to ``out_path``.

    ``metadata`` is stored in the file as strings (ONNX ``metadata_props``, or the TorchScript archive's
    extra file ``facepipe.json``); ``read_metadata`` reads it back.
    """
    if fmt not in FORMATS:
        raise FacepipeError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if opset < 17:
        raise FacepipeError(f"ONNX opset {opset} is too old; use 17 or newer")
    model = model.eval()
    out_path = Path(out_path)
    names = _output_names(model, example)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_path(out_path) as tmp, warnings.catch_warnings():
        # the TorchScript-based exporter and tracer warn about their own deprecation; nothing to act on
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["images"],
                output_names=names,
                dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                do_constant_folding=True,
            )
            if meta:
                import onnx

                proto = onnx.load(str(tmp))
                for key, value in meta.items():
                    proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
                onnx.save(proto, str(tmp))
        else:
            with torch.no_grad():
                traced = torch.jit.trace(model, (example,), check_trace=False)
            traced.save(str(tmp), _extra_files={METADATA_FILE: json.dumps(meta)})
    return out_path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata ``export_model`` stored in an exported file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return {p.key: p.value for p in proto.metadata_props}
    extra = {METADATA_FILE: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_FILE] or "{}")


def _backbone_metadata(backbone: nn.Module) -> dict[str, object]:
    h, w = getattr(backbone, "input_size", (112, 112))
    return {"input_shape": f"N,3,{h},{w}", "embedding_size": getattr(backbone, "embedding_size", "")}


class ExportOptions(TypedDict, total=False):
    """The keyword options of both exports (their defaults: `_export_on_backbone`)."""

    fmt: Format  # "onnx" (default) or "torchscript"
    batch: int  # rows of the example batch the model is traced on (default 2)
    opset: int  # ONNX opset (default DEFAULT_OPSET)
    metadata: dict[str, object] | None  # stored in the file after the entries export writes itself


def export_backbone(
    backbone: nn.Module, out_path: str | os.PathLike, **options: Unpack[ExportOptions]
) -> Path:
    """Export a registry backbone (it has ``forward_features`` and ``input_size``): images → embedding."""
    outputs = {"outputs": "embedding"}
    return _export_on_backbone(EmbeddingOnly(backbone), backbone, out_path, outputs, **options)


def export_with_uncertainty(
    backbone: nn.Module,
    head: nn.Module,
    method: str,
    out_path: str | os.PathLike,
    **options: Unpack[ExportOptions],
) -> Path:
    """Export backbone + uncertainty head: images → (embedding, σ² for PFE/ProbFace or κ for SCF)."""
    spec = get_method(method)
    outputs = {"outputs": f"embedding,{spec.uncertainty_name}", "uncertainty_method": spec.name}
    model = EmbeddingWithUncertainty(backbone, head, method)
    return _export_on_backbone(model, backbone, out_path, outputs, **options)


def _export_on_backbone(
    model: nn.Module,
    backbone: nn.Module,
    out_path: str | os.PathLike,
    outputs: dict[str, object],
    *,
    fmt: Format = "onnx",
    batch: int = 2,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, object] | None = None,
) -> Path:
    """`export_model` of a module over ``backbone``, traced on images of the backbone's input size.

    The file's metadata: the backbone's shapes, then ``outputs`` (what the model returns), then ``metadata``.
    """
    meta = {**_backbone_metadata(backbone), **outputs, **(metadata or {})}
    example = example_images(backbone, batch)
    return export_model(model, example, out_path, fmt=fmt, opset=opset, metadata=meta)


def example_images(backbone: nn.Module, batch: int = 2, seed: int = 0) -> Tensor:
    """A deterministic random image batch of the backbone's input size (values in [-1, 1])."""
    h, w = getattr(backbone, "input_size", (112, 112))
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g) * 2 - 1


def run_exported(path: str | os.PathLike, images: Tensor) -> list[np.ndarray]:
    """Run an exported file on ``images`` (ONNX through onnxruntime on CPU, else TorchScript)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: images.detach().cpu().numpy()}
        return [np.asarray(o) for o in session.run(None, feed)]
    module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        out = module(images)
    outs = out if isinstance(out, tuple | list) else (out,)
    return [o.detach().cpu().numpy() for o in outs]


def verify_export(path: str | os.PathLike, model: nn.Module, images: Tensor, atol: float = 1e-5) -> float:
    """Largest error of the exported model against eager over all outputs; FacepipeError beyond ``atol``.

    Each output's error is max|exported − eager| / max(1, max|eager|): absolute for outputs of unit size,
    relative to the output's scale otherwise (a float32 eager run is itself only that close to float64:
    an un-normalised embedding of norm ~25 differs from its float64 value by ~2e-5 in absolute terms).
    """
    model = model.eval()
    with torch.no_grad():
        eager = model(images)
    eager_outs = [o.detach().cpu().numpy() for o in (eager if isinstance(eager, tuple | list) else (eager,))]
    exported = run_exported(path, images)
    if len(exported) != len(eager_outs):
        raise FacepipeError(f"{path}: exported model has {len(exported)} outputs, eager {len(eager_outs)}")
    worst = 0.0
    for want, got in zip(eager_outs, exported, strict=True):
        if want.shape != got.shape:
            raise FacepipeError(f"{path}: exported output shape {got.shape} != eager {want.shape}")
        if want.size:
            scale = max(1.0, float(np.max(np.abs(want))))
            err = float(np.max(np.abs(got.astype(np.float64) - want))) / scale
        else:
            err = 0.0
        worst = max(worst, err)
    if worst > atol:
        raise FacepipeError(f"{path}: exported outputs differ from eager by {worst:.3g} (> {atol})")
    return worst


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    fmt: Format = "onnx",
    head: str | os.PathLike | None = None,
    backbone_only: bool = False,
    opset: int = DEFAULT_OPSET,
) -> dict[str, object]:
    """Export a trained model from disk and check it against eager; returns what was written.

    ``checkpoint``: a backbone bundle (``bundle.json``) or a folder holding one, such as an MLflow model's
    artifacts. The uncertainty head (``head.json`` + ``head.pt`` from the uncertainty stage) is taken from
    ``head`` or, when not given, from inside ``checkpoint`` if one is there; ``backbone_only`` skips it.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FacepipeError(f"checkpoint {checkpoint} does not exist")
    bundle_dir = find_bundle(checkpoint)
    backbone, info, _ = load_bundle(bundle_dir)
    head_dir = (
        None
        if backbone_only
        else _find_head(Path(head) if head is not None else checkpoint, head is not None)
    )
    images = example_images(backbone, batch=2, seed=1)
    meta = {"backbone": info.backbone, "color_order": info.color_order, "source": str(bundle_dir)}
    if head_dir is None:
        path = export_backbone(backbone, out_path, fmt=fmt, opset=opset, metadata=meta)
        err = verify_export(path, EmbeddingOnly(backbone), images)
        method = None
    else:
        head_model = load_head(head_dir)
        method = head_model.method
        path = export_with_uncertainty(
            backbone, head_model.head, method, out_path, fmt=fmt, opset=opset, metadata=meta
        )
        err = verify_export(path, EmbeddingWithUncertainty(backbone, head_model.head, method), images)
    return {
        "path": path,
        "format": fmt,
        "backbone": info.backbone,
        "bundle": bundle_dir,
        "head": head_dir,
        "method": method,
        "input_size": tuple(info.input_size),
        "color_order": info.color_order,
        "max_error_vs_eager": err,
    }


def _find_head(root: Path, required: bool) -> Path | None:
    if (root / HEAD_META).is_file():
        return root
    found = sorted(p.parent for p in root.rglob(HEAD_META)) if root.is_dir() else []
    if not found and required:
        raise FacepipeError(f"no uncertainty head ({HEAD_META}) under {root}")
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------
# The registered pyfunc: tensors, or encoded images (aligned faces, or photos with align=true)
# ---------------------------------------------------------------------------------------------

DETECTOR_ENV = "FACEPIPE_DETECTOR_MODEL"  # a YuNet model for align=true when none was registered


def python_model() -> Any:
    """The MLflow PythonModel logged with every registered version (defined here, pickled by value)."""
    from mlflow.pyfunc import PythonModel

    class FacepipeModel(PythonModel):
        """Images -> embeddings (and uncertainties): NCHW float32 normalised as in training, or encoded
        JPEG/PNG (bytes or base64) of aligned faces, or of photos with `align=true` (param or column)."""

        def load_context(self, context):
            from facepipe.models.photo import FaceModel

            self.model = FaceModel(context.artifacts["bundle"], context.artifacts.get("head"))
            self.detector = context.artifacts.get("detector") or os.environ.get(DETECTOR_ENV)
            # the pre-pyfunc-change attribute names, for callers that reached into the model
            self.backbone, self.info, self.head = self.model.backbone, self.model.info, self.model.head

        def predict(self, context, model_input, params=None):  # no hints: MLflow would validate by them
            from mlflow.exceptions import MlflowException

            try:
                return pyfunc_predict(self.model, self.detector, model_input, params or {})
            except FacepipeError as err:  # bad input: HTTP 400 with the reason, not a 500
                raise MlflowException.invalid_parameter_value(str(err)) from err

    return FacepipeModel()


def pyfunc_predict(model: Any, detector: str | None, model_input: Any, params: dict[str, Any]) -> Any:
    """The pyfunc's answer: an embedding array (bare backbone) or {"embedding", "uncertainty"}."""
    kind, payload, align = _parse_pyfunc_input(model_input, bool(params.get("align", False)))
    if kind == "tensor":
        h, w = model.input_size
        try:
            x = np.asarray(payload, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise FacepipeError(f"input is neither encoded images nor a float tensor: {err}") from None
        if x.ndim == 2 and x.shape[1] == 3 * h * w:  # flattened rows (a DataFrame of pixel columns)
            x = x.reshape(-1, 3, h, w)
        if x.ndim != 4 or x.shape[1:] != (3, h, w):
            raise FacepipeError(f"tensor input must be (N, 3, {h}, {w}) float32, not {x.shape}")
    else:
        from facepipe.models.preprocess import to_model_input

        x = to_model_input(_encoded_to_input(model, detector, payload, align, params))
    emb, unc = model.forward(x)
    return emb if unc is None else {"embedding": emb, "uncertainty": unc}


def _parse_pyfunc_input(value: Any, align: bool) -> tuple[str, Any, list[bool]]:
    """("tensor", array, []) or ("encoded", [bytes | str, ...], [align per image])."""
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        if "image" not in value.columns:
            return "tensor", value.to_numpy(), []
        value = {c: value[c].tolist() for c in value.columns}
    if isinstance(value, dict):
        if "images" in value:
            return _parse_pyfunc_input(value["images"], align)
        if "image" not in value:
            raise FacepipeError(f"input has keys {sorted(value)}; expected 'images' (tensor) or 'image'")
        images = list(np.atleast_1d(np.asarray(value["image"], dtype=object)))
        flags = value.get("align")
        flags = [align] if flags is None else [bool(f) for f in np.atleast_1d(flags)]
        if len(flags) not in (1, len(images)):
            raise FacepipeError(f"{len(flags)} align flags for {len(images)} images")
        return "encoded", images, flags * len(images) if len(flags) == 1 else flags
    if isinstance(value, list | tuple | np.ndarray) and len(value):
        first = value[0]
        if isinstance(first, dict):  # records: [{"image": ..., "align": ...}, ...]
            rows = list(value)
            flags = [bool(r.get("align", align)) for r in rows]
            return "encoded", [r.get("image") for r in rows], flags
        if isinstance(first, str | bytes | bytearray):
            return "encoded", list(value), [align] * len(value)
    return "tensor", value, []


def _encoded_to_input(
    model: Any, detector: str | None, images: list[Any], align: list[bool], params: dict[str, Any]
) -> np.ndarray:
    """Encoded images -> uint8 NHWC for the model; photos flagged `align` go through detection first."""
    from facepipe.models.photo import PhotoAligner, decode_photo_bytes, encoded_bytes

    aligner = None
    crops = []
    for i, (value, flag) in enumerate(zip(images, align, strict=True)):
        where = f"input image {i}"
        image = decode_photo_bytes(encoded_bytes(value, where), where)
        if flag:
            if aligner is None:
                if not detector:
                    raise FacepipeError(
                        f"align=true needs a face detector: none was registered with the model; "
                        f"set {DETECTOR_ENV} to a YuNet ONNX file"
                    )
                aligner = PhotoAligner(detector, model.input_size, float(params.get("min_score", 0.6)))
            image = aligner.align(image, where).crop
        crops.append(image)
    return model.to_input(crops)
