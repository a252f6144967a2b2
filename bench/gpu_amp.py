"""Mixed precision on a GPU: do the heads stay accurate under autocast, and what does AMP buy?

Prints one JSON object:
- for every margin head in the registry, the loss and the gradient w.r.t. the embeddings under
  autocast (fp16 and bf16) against fp32 on identical inputs (`rel_loss_err`, `grad_cos`), and whether
  everything stayed finite;
- the same for each uncertainty method's loss (PFE, ProbFace, SCF) on a frozen-backbone batch;
- IResNet-50 training steps (forward + margin head + backward + SGD) per second in fp32 and with AMP,
  and their `speedup`, measured back to back in this run.

Needs a CUDA device; on a machine without one it says so and exits 0 without numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from facepipe.models.registry import MARGIN_HEADS, build_backbone, build_margin_head
from facepipe.uncertainty.registry import build_uncertainty_head, get_method


def head_under_autocast(name: str, dtype: torch.dtype, device: str, batch: int, classes: int) -> dict:
    torch.manual_seed(0)
    head = build_margin_head(name, embedding_size=512, num_classes=classes).to(device)
    emb = torch.randn(batch, 512, device=device) * 8
    labels = torch.randint(0, classes, (batch,), device=device)

    def run(amp: bool) -> tuple[float, torch.Tensor]:
        x = emb.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=dtype, enabled=amp):
            loss = head.loss(x, labels)
        loss.float().backward()
        return loss.item(), x.grad.detach().float().flatten()

    ref_loss, ref_grad = run(False)
    amp_loss, amp_grad = run(True)
    return {
        "rel_loss_err": abs(amp_loss - ref_loss) / max(abs(ref_loss), 1e-12),
        "grad_cos": float(torch.nn.functional.cosine_similarity(ref_grad, amp_grad, dim=0)),
        "finite": bool(torch.isfinite(amp_grad).all()) and amp_loss == amp_loss,
    }


def uncertainty_under_autocast(method: str, dtype: torch.dtype, device: str) -> dict:
    torch.manual_seed(0)
    p, k, dim = 16, 4, 512
    head = build_uncertainty_head(method, in_channels=512, embedding_size=dim).to(device)
    feats = torch.randn(p * k, 512, 7, 7, device=device)
    mu = torch.nn.functional.normalize(torch.randn(p * k, dim, device=device), dim=1)
    labels = torch.arange(p, device=device).repeat_interleave(k)
    centres = torch.nn.functional.normalize(torch.randn(p, dim, device=device), dim=1)
    spec = get_method(method)

    def run(amp: bool) -> float:
        head.zero_grad()
        with torch.autocast("cuda", dtype=dtype, enabled=amp):
            out = head(feats)  # both kinds take the 512x7x7 map (PFE/ProbFace flatten it)
            total, _ = spec.loss(mu, out.float(), labels, class_weights=centres)
        total.backward()
        return total.item()

    ref, amp = run(False), run(True)
    return {"rel_loss_err": abs(amp - ref) / max(abs(ref), 1e-12), "finite": amp == amp}


def train_steps_per_s(amp: bool, device: str, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    backbone = build_backbone("iresnet50").to(device)
    head = build_margin_head("arcface", embedding_size=512, num_classes=10_000).to(device)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    images = torch.randn(batch, 3, 112, 112, device=device)
    labels = torch.randint(0, 10_000, (batch,), device=device)
    for step in range(steps + 3):  # 3 warm-up steps
        if step == 3:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = head.loss(backbone(images), labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        scaler.step(opt)
        scaler.update()
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    device = "cuda"
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for label, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        result[f"margin_heads_{label}"] = {
            name: head_under_autocast(name, dtype, device, batch=512, classes=2000)
            for name in sorted(MARGIN_HEADS)
        }
        result[f"uncertainty_{label}"] = {
            m: uncertainty_under_autocast(m, dtype, device) for m in ("pfe", "probface", "scf")
        }
    fp32 = train_steps_per_s(False, device, args.batch, args.steps)
    amp = train_steps_per_s(True, device, args.batch, args.steps)
    result["iresnet50_train"] = {
        "batch": args.batch,
        "fp32_steps_s": round(fp32, 2),
        "amp_steps_s": round(amp, 2),
        "fp32_images_s": round(fp32 * args.batch),
        "amp_images_s": round(amp * args.batch),
        "speedup": round(amp / fp32, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
