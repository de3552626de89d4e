"""A plain PyTorch BUSI classifier with one switch per way the product's recipe differed from it (issue 19).

The defaults are the plain recipe: stretch-resize to a square, horizontal flip + random scale 0.8-1.0 +
translate +-10%, no class weights, best epoch by validation accuracy on a stratified 10% slice of the train
split, AdamW lr 1e-3 wd 5e-4 batch 32, cosine per step without warmup, grey normalised with one mean/std and
repeated to 3 channels. Each ``--<factor>`` flag swaps in the product's old choice, using the product's own
code where the factor is code (zero-pad resize, the ultrasound augmentation of issue 19's time, Adam's L2), so
the diagnosis bisects the real components. Test split: the manifest's. One JSON line per run on stdout.

    python benchmarks/recipe/plain.py --size 64 --epochs 25 --seed 0
    python benchmarks/recipe/plain.py --size 64 --epochs 25 --seed 0 --resize pad --aug product ...
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["benign", "malignant", "normal"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The product's ultrasound recipe before issue 19 (rotation 10 deg, zoom 0.9-1.1, gamma 0.8-1.25, flip).
OLD_ULTRASOUND = dict(hflip=0.5, rotate_deg=10, rotate_p=0.5, zoom=(0.9, 1.1), zoom_p=0.5, gamma=(0.8, 1.25),
                      gamma_p=0.3)


def load_images(frame: pd.DataFrame, root: Path, size: int, resize: str) -> torch.Tensor:
    """uint8 (N, 1, S, S) grey images, cached in /tmp per (size, resize) so parallel runs decode once."""
    cache = Path(f"/tmp/busi_recipe_{size}_{resize}.npy")
    if cache.is_file():
        return torch.from_numpy(np.load(cache))
    if resize == "stretch":
        arrs = [np.asarray(Image.open(root / p).convert("L").resize((size, size), Image.BILINEAR, reducing_gap=None))
                for p in frame["path"]]
        out = np.stack(arrs)[:, None]
    else:  # the product's deterministic part: aspect kept, area resize, centre zero-pad
        from medgcsam.data.datasets import to_uint8
        from medgcsam.data.transforms import deterministic_transforms
        from medgcsam.models.factory import InputSpec

        det = deterministic_transforms(InputSpec(size, 1, (0.5,), (0.25,)), "ultrasound", normalize=False)
        out = np.stack([to_uint8(det({"image": str(root / p)})["image"]).numpy() for p in frame["path"]])
    np.save(cache, out)
    return torch.from_numpy(out)


def plain_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """hflip p=0.5, scale U(0.8, 1.0), translate U(-0.1, 0.1) of the side; float (B, C, S, S) in, same out."""
    b = x.shape[0]
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    scale = 0.8 + 0.2 * torch.rand(b, generator=gen)
    shift = (torch.rand(b, 2, generator=gen) * 0.2 - 0.1) * 2  # fraction of the side, in [-1, 1] grid units
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = flip / scale  # output -> input: a shrink by `scale` samples a wider field
    theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = -shift / scale[:, None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resize", choices=["stretch", "pad"], default="stretch")
    ap.add_argument("--aug", choices=["plain", "product"], default="plain")
    ap.add_argument("--class-weights", action="store_true", help="balanced class weights (product)")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--val", choices=["slice", "fold0"], default="slice")
    ap.add_argument("--monitor", choices=["acc", "bacc"], default="acc")
    ap.add_argument("--patience", type=int, default=None)
    ap.add_argument("--warmup", type=float, default=0.0, help="warmup epochs (product: 1-2, min lr ratio 0.01)")
    ap.add_argument("--norm", choices=["grey3", "imagenet3", "grey1"], default="grey3")
    ap.add_argument("--opt", choices=["adamw", "adam"], default="adamw", help="adam = L2 weight decay")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)

    df = pd.read_csv(ROOT / "data_manifests/busi.csv", keep_default_na=False)
    df = df[df["exclude_reason"] == ""].reset_index(drop=True)  # the product leaves these out too
    images = load_images(df, ROOT.parent / "shared/data/busi", a.size, a.resize)
    labels = torch.tensor([CLASSES.index(c) for c in df["label"]])
    train_idx = np.flatnonzero(df["split"] == "train")
    test_idx = np.flatnonzero(df["split"] == "test")
    if a.val == "slice":
        tr, va = train_test_split(train_idx, test_size=0.1, stratify=labels[train_idx].numpy(), random_state=a.seed)
    else:
        fold = df["fold"].to_numpy()
        tr, va = train_idx[fold[train_idx] != 0], train_idx[fold[train_idx] == 0]

    if a.norm == "imagenet3":
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    else:
        g = images[tr].float() / 255
        mean, std = g.mean().reshape(1, 1, 1), g.std().reshape(1, 1, 1)
    chans = 1 if a.norm == "grey1" else 3

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return ((x.expand(-1, chans, -1, -1) if chans == 3 else x) - mean) / std

    product_aug = None
    if a.aug == "product":
        from medgcsam.data.transforms import AugmentRecipe, BatchAugmentd

        product_aug = BatchAugmentd(["image"], AugmentRecipe(**OLD_ULTRASOUND))
        product_aug.set_random_state(seed=a.seed)

    model = timm.create_model(a.arch, pretrained=False, num_classes=3, in_chans=chans)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = (torch.optim.AdamW if a.opt == "adamw" else torch.optim.Adam)(groups, lr=a.lr, weight_decay=a.wd)
    steps = len(tr) // a.batch
    total, warm = a.epochs * steps, round(a.warmup * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        prog = min(1.0, (step - warm) / max(1, total - warm))
        floor = 0.01 if warm else 0.0  # the product's min_lr_ratio comes with its warmup
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    weight = None
    if a.class_weights:
        counts = torch.bincount(labels[tr], minlength=3).double()
        weight = (counts.sum() / (3 * counts)).float()
    crit = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=a.label_smoothing)

    @torch.no_grad()
    def predict(idx: np.ndarray) -> np.ndarray:
        model.eval()
        out = torch.cat([model(prep(images[idx[i:i + 128]])).argmax(1) for i in range(0, len(idx), 128)])
        model.train()
        return out.numpy()

    best, best_state, best_epoch, bad, t0 = -1.0, None, -1, 0, time.time()
    for epoch in range(a.epochs):
        perm = torch.from_numpy(tr)[torch.randperm(len(tr), generator=gen)]
        for s in range(steps):
            idx = perm[s * a.batch:(s + 1) * a.batch]
            x = images[idx]
            if product_aug is not None:
                x = product_aug({"image": x.clone()})["image"]
            else:
                x = plain_augment(x.float() / 255, gen)
            loss = crit(model(prep(x)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        pv, yv = predict(va), labels[va].numpy()
        score = float((pv == yv).mean()) if a.monitor == "acc" else float(balanced_accuracy_score(yv, pv))
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if a.patience is not None and bad >= a.patience:
                break
    last_pred = predict(test_idx)
    model.load_state_dict(best_state)
    pt, yt = predict(test_idx), labels[test_idx].numpy()
    print(json.dumps({"tag": a.tag, **{k: v for k, v in vars(a).items() if k != "tag"},
                      "test_acc": float((pt == yt).mean()), "test_bacc": float(balanced_accuracy_score(yt, pt)),
                      "last_test_acc": float((last_pred == yt).mean()), "best_epoch": best_epoch + 1,
                      "epochs_run": epoch + 1, "val_best": best, "n_train": len(tr), "n_val": len(va),
                      "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
