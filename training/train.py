"""The training loop: Adam, BCE + Dice on low-resolution logits, augmentations, checkpoints, resume.

A run folder holds ``last.ckpt`` (written at every validation, used by ``--resume``), ``best.ckpt``
(lowest validation loss), and ``history.json`` (loss and validation figures per step).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctscreen.machine import code_commit
from training import datasets
from training.datasets import Source, Volume
from training.nets import HUSegmenter, NetSpec, spec_for

logger = logging.getLogger(__name__)

AIR_HU = -1024.0


@dataclass
class TrainConfig:
    """One training run (see ``ctscreen train --help`` for the meaning of each field)."""

    task: str
    profile: str = "lite"
    source: Source = field(default_factory=lambda: Source("phantom"))
    out: Path = Path("runs/run")
    studies: int = 48
    slices: int = 64
    val_studies: int = 6
    seed: int = 0
    steps: int = 2000
    batch: int = 8
    lr: float = 2e-3
    val_every: int = 250
    resume: bool = False
    device: str | None = None
    threads: int | None = None
    progress: bool = True
    spec: NetSpec | None = None
    augment: bool = True
    jpeg: bool = True
    """Put half of the 8-bit exports through JPEG (added after version 2.0.0; False draws no random number
    for it, so a 2.0.0 recipe replays its random stream)."""
    noise_hu: float = 25.0
    """The strongest Gaussian noise added (standard deviation in HU, drawn uniformly from 0 to it a slice)."""
    textured_noise: bool = False
    """Correlate half of the slices' noise over about a pixel, as a reconstruction kernel does (low-dose CT
    noise is textured); False draws no random number for it, so an older recipe replays its random stream."""
    crop: int | None = None
    """Train on windows of this size at the net's resolution (None: whole slices)."""
    hard_negatives: float = 0.0
    """Weight of the hardest 1 % of background pixels' loss (see :func:`bce_dice_loss`)."""
    max_slices_per_volume: int | None = None
    val_slices_per_volume: int | None = 32

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in {"spec", "source", "out"}}
        d["source"] = self.source.describe()
        d["out"] = str(self.out)
        return d


# --- augmentation ------------------------------------------------------------------------------


def augment(
    hu: torch.Tensor, target: torch.Tensor, gen: torch.Generator, *, max_rot_deg: float = 8.0, jpeg: bool = True,
    noise_hu: float = 25.0, textured_noise: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-right flips, small affine (rotation, scale, shift), HU window jitter and noise (up to
    ``noise_hu``; with ``textured_noise``, half of the slices' noise correlated over about a pixel), a
    softer kernel, and an 8-bit export round trip (with ``jpeg``, half of them through JPEG at a random
    quality).

    ``hu`` is float HU ``[B, 1, 512, 512]``; ``target`` ``[B, 1, S, S]`` gets the same geometry.
    """
    b = hu.shape[0]
    dev = hu.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen).to(dev)

    flip = torch.rand(b, generator=gen).to(dev) < 0.5
    hu = torch.where(flip[:, None, None, None], hu.flip(-1), hu)
    target = torch.where(flip[:, None, None, None], target.flip(-1), target)
    # affine: rotation, isotropic scale, shift (normalised coordinates), applied with p = 0.7
    on = (torch.rand(b, generator=gen).to(dev) < 0.7).float()
    ang = u(-max_rot_deg, max_rot_deg) * math.pi / 180 * on
    scale = 1 + u(-0.2, 0.2) * on
    tx, ty = u(-0.06, 0.06) * on, u(-0.06, 0.06) * on
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(hu.shape), align_corners=False)
    hu = F.grid_sample(hu - AIR_HU, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    hu = hu + AIR_HU
    tgrid = F.affine_grid(theta, list(target.shape), align_corners=False)
    target = F.grid_sample(target, tgrid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # window jitter (calibration / kernel differences) and noise
    hu = hu * (1 + u(-0.05, 0.05))[:, None, None, None] + u(-40, 40)[:, None, None, None]
    sigma = u(0, noise_hu)[:, None, None, None]
    noise = torch.randn(hu.shape, generator=gen).to(dev)
    if textured_noise:  # a Gaussian of 0.8 pixel (benchmarks.noise's "textured"), scaled back to unit deviation
        textured = torch.rand(b, generator=gen).to(dev) < 0.5
        g = torch.exp(-torch.arange(-2.0, 3.0, device=dev) ** 2 / (2 * 0.8**2))
        g = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
        smooth = F.conv2d(F.pad(noise, (2, 2, 2, 2), mode="reflect"), g)
        smooth = smooth / smooth.std(dim=(1, 2, 3), keepdim=True)
        noise = torch.where(textured[:, None, None, None], smooth, noise)
    hu = hu + noise * sigma
    # scanners and exports: a softer kernel (blur, p = 0.3) and an 8-bit lung-window export round
    # trip (p = 0.4: clipped at a random window's ends, 256 grey levels), as the real JPEG slices are
    soft = torch.rand(b, generator=gen).to(dev) < 0.3
    kern = torch.tensor([1.0, 2.0, 1.0], device=dev)
    kern = (kern[:, None] * kern[None, :] / 16.0)[None, None]
    blurred = F.conv2d(F.pad(hu, (1, 1, 1, 1), mode="replicate"), kern)
    hu = torch.where(soft[:, None, None, None], blurred, hu)
    export = torch.rand(b, generator=gen).to(dev) < 0.4
    lo = u(-1400, -1000)[:, None, None, None]
    width = u(1000, 2000)[:, None, None, None]
    q = torch.round(((hu - lo) / width * 255).clamp(0, 255)) / 255 * width + lo
    hu = torch.where(export[:, None, None, None], q, hu)
    if not jpeg:
        return hu, target.clamp(0, 1)
    # half of those exports were saved as JPEG, at a quality between 40 and 95 (the real slices are
    # JPEGs of unknown quality: blocking and ringing at 8 x 8 blocks, smeared fine texture)
    as_jpeg = (torch.rand(b, generator=gen) < 0.5) & export.cpu()
    quality = torch.randint(40, 96, (b,), generator=gen)
    for i in torch.nonzero(as_jpeg).flatten().tolist():
        lo_i, width_i = float(lo[i]), float(width[i])
        item = hu[i, 0].detach().cpu().numpy()
        hu[i, 0] = torch.from_numpy(jpeg_round_trip(item, lo_i, width_i, int(quality[i]))).to(dev)
    return hu, target.clamp(0, 1)


def jpeg_round_trip(hu: np.ndarray, lo: float, width: float, quality: int) -> np.ndarray:
    """A 2-D HU slice exported as an 8-bit JPEG through the window ``[lo, lo + width]`` at ``quality``
    and read back into HU (float32), as the real training slices were made.

    >>> hu = np.linspace(-1000, 200, 64 * 64, dtype=np.float32).reshape(64, 64)
    >>> back = jpeg_round_trip(hu, -1200.0, 1600.0, 95)
    >>> back.dtype, back.shape, bool(np.abs(back - hu).mean() < 1600 / 255)
    (dtype('float32'), (64, 64), True)
    """
    import io

    from PIL import Image

    grey = np.clip(np.round((hu - lo) / width * 255), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="JPEG", quality=int(quality))
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"), dtype=np.float32)
    return (back / 255 * width + lo).astype(np.float32)


# --- loss --------------------------------------------------------------------------------------


def bce_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    smooth: float = 1.0,
    *,
    weight: torch.Tensor | None = None,
    hard_negatives: float = 0.0,
) -> torch.Tensor:
    """Binary cross-entropy (on logits) plus soft Dice loss over the whole batch.

    ``weight`` ``[B]`` scales each item's cross-entropy (pseudo-labels count less than a radiologist's
    masks). ``hard_negatives`` > 0 adds the mean cross-entropy of the hardest 1 % of background pixels
    times that factor (online hard-negative mining): a false-positive blob on a lesion-free part of a
    real lung costs far more than its share of the pixels.
    """
    bce_px = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if weight is not None:
        bce_px = bce_px * weight.to(bce_px.dtype)[:, None, None, None]
    bce = bce_px.mean()
    if hard_negatives > 0:
        neg = (bce_px * (target < 0.05)).flatten()
        k = max(1, neg.numel() // 100)
        bce = bce + hard_negatives * neg.topk(k).values.mean()
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    dice = (2 * inter + smooth) / (p.sum() + target.sum() + smooth)
    return bce + (1 - dice)


def lr_factor(step: int, total: int, warmup: float = 0.05, floor: float = 0.02) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to 2 % of the peak rate."""
    w = max(1, int(total * warmup))
    if step < w:
        return (step + 1) / w
    t = min(1.0, (step - w) / max(1, total - w))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


# --- loop --------------------------------------------------------------------------------------


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _volumes(cfg: TrainConfig, split: str, source: Source | None = None) -> Iterable[Volume]:
    source = source or cfg.source
    if source.kind == "mix":
        return itertools.chain.from_iterable(_volumes(cfg, split, part) for part in source.parts)
    if source.kind == "real":
        from training import realct

        return realct.real_volumes(split, source.path, max_slices=cfg.max_slices_per_volume)
    if source.kind == "phantom":
        if split == "train":
            seed0, n = datasets.PHANTOM_TRAIN_SEED0 + cfg.seed * 10_000, cfg.studies
        else:
            seed0, n = datasets.PHANTOM_VAL_SEED0 + cfg.seed * 10_000, cfg.val_studies
        return datasets.phantom_volumes(n, seed0, n_slices=cfg.slices)
    path = source.path
    if path is None:
        raise datasets.DataError(f"source {source.kind!r} names no folder.")
    if source.kind == "phantom-dir":
        dirs = sorted(p.parent for p in path.rglob("manifest.json"))
        return (datasets.load_phantom_dir(dirs[i]) for i in _split_order(len(dirs), path, cfg.seed, split))
    cases = datasets.nifti_cases(path)
    return (datasets.load_nifti_case(*cases[i]) for i in _split_order(len(cases), path, cfg.seed, split))


def _split_order(n: int, path: Path, seed: int, split: str) -> np.ndarray:
    """Indices of the ``split`` studies of the ``n`` under ``path``: a tenth (at least one) for validation."""
    if not n:
        raise datasets.DataError(f"{path}: no studies found.")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, n // 10) if n > 1 else 0
    return order[:n_val] if split == "val" else order[n_val:] if n_val else order


def data_manifest(cfg: TrainConfig, train_bank: datasets.SliceBank, val_bank) -> dict:
    """What the model was trained on (goes into the checkpoint and the model card)."""
    m: dict = {"source": cfg.source.describe(), "task": cfg.task}
    kinds = {p.kind for p in cfg.source.parts} if cfg.source.kind == "mix" else {cfg.source.kind}
    if "real" in kinds:
        from training import realct

        m["real_ct"] = {
            "medseg": "medseg-100/train: 40 train / 10 val (every fifth file); medseg-100/test never used",
            "pseudo_val": list(realct.PSEUDO_SPLIT["val"]),
            "pseudo_test": list(realct.PSEUDO_SPLIT["test"]),
            "pseudo_label_weight": realct.PSEUDO_WEIGHT,
            "licence": "images without a stated licence (MedSeg, COVID-19-CT-Seg via Inf-Net): research only",
        }
    if "phantom" in kinds:
        s0 = datasets.PHANTOM_TRAIN_SEED0 + cfg.seed * 10_000
        v0 = datasets.PHANTOM_VAL_SEED0 + cfg.seed * 10_000
        m["train_seeds"] = [s0, s0 + cfg.studies - 1]
        m["val_seeds"] = [v0, v0 + cfg.val_studies - 1]
        m["kind_cycle"] = list(datasets.PHANTOM_KIND_CYCLE)
        m["slices_per_study"] = cfg.slices
        try:
            import phantom

            m["phantom_version"] = getattr(phantom, "__version__", "unknown")
        except ImportError:  # pragma: no cover
            pass
    commit, dirty = code_commit()  # a card names the code its weights came from
    m["code"] = {"commit": commit, "dirty": dirty}
    m["train_cases"] = sorted(set(train_bank.case.tolist()))
    m["train_slices"] = train_bank.counts()
    m["val_slices"] = val_bank.counts() if val_bank is not None else {}
    return m


@torch.no_grad()
def evaluate_bank(model: HUSegmenter, bank: datasets.SliceBank, device: torch.device, batch: int = 16) -> dict:
    """Validation loss, Dice and (lesion) a slice-level detection proxy on a bank (no augmentation)."""
    model.eval()
    losses, inter, psum, tsum = [], 0.0, 0.0, 0.0
    tp = fp = fn = tn = 0
    for i in range(0, len(bank), batch):
        hu = torch.from_numpy(bank.hu[i : i + batch][:, None]).to(device)
        tgt = torch.from_numpy(bank.target[i : i + batch].astype(np.float32)).to(device)
        z = model.logits(hu)
        losses.append(float(bce_dice_loss(z, tgt)) * len(hu))
        p = (torch.sigmoid(z) >= 0.5).float()
        t = (tgt >= 0.5).float()
        inter += float((p * t).sum())
        psum += float(p.sum())
        tsum += float(t.sum())
        pos_pred = p.flatten(1).sum(1) >= 2
        pos_true = t.flatten(1).sum(1) >= 2
        tp += int((pos_pred & pos_true).sum())
        fp += int((pos_pred & ~pos_true).sum())
        fn += int((~pos_pred & pos_true).sum())
        tn += int((~pos_pred & ~pos_true).sum())
    model.train()
    return {
        "val_loss": sum(losses) / len(bank),
        "val_dice": (2 * inter + 1) / (psum + tsum + 1),
        "val_slice_sens": tp / max(1, tp + fn),
        "val_slice_spec": tn / max(1, tn + fp),
    }


def _save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, str(tmp))
    tmp.replace(path)


def train(
    cfg: TrainConfig,
    *,
    train_volumes: Iterable[Volume] | None = None,
    val_volumes: Iterable[Volume] | None = None,
) -> dict:
    """Train one network; returns a summary (final and best validation figures, paths).

    ``train_volumes``/``val_volumes`` override ``cfg.source`` (tests use small synthetic volumes).
    """
    if cfg.task not in ("valid_area", "lesion"):
        raise ValueError(f'Argument "cfg.task" must be valid_area or lesion, got {cfg.task!r}.')
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    if device.type == "cuda":  # the same run gives the same weights (CPU kernels already do)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    spec = cfg.spec or spec_for(cfg.task, cfg.profile)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    tv = train_volumes if train_volumes is not None else _volumes(cfg, "train")
    bank = datasets.SliceBank(cfg.task, spec.input_size, tv, max_slices_per_volume=cfg.max_slices_per_volume)
    vv = val_volumes if val_volumes is not None else _volumes(cfg, "val")
    val_bank = (
        datasets.SliceBank(cfg.task, spec.input_size, vv, max_slices_per_volume=cfg.val_slices_per_volume)
        if vv is not None
        else None
    )
    logger.info("data: %d train slices %s, %d val slices, %.0f s", len(bank), bank.counts(),
                len(val_bank) if val_bank else 0, time.perf_counter() - t0)

    model = HUSegmenter(spec).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps))
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    step, best = 0, math.inf
    manifest = data_manifest(cfg, bank, val_bank)

    if cfg.resume:
        ckpt = torch.load(str(out / "last.ckpt"), map_location=device, weights_only=False)
        if ckpt["task"] != cfg.task or NetSpec.from_dict(ckpt["spec"]) != spec:
            raise ValueError(f"{out / 'last.ckpt'} was written for another task or architecture.")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        rng.bit_generator.state = ckpt["rng"]
        gen.set_state(ckpt["torch_gen"])
        step, best, history = ckpt["step"], ckpt.get("best", math.inf), ckpt.get("history", [])
        logger.info("resumed from step %d", step)

    def payload(metrics: dict | None) -> dict:
        return {
            "task": cfg.task,
            "profile": cfg.profile,
            "spec": spec.to_dict(),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": rng.bit_generator.state,
            "torch_gen": gen.get_state(),
            "step": step,
            "best": best,
            "history": history,
            "config": cfg.to_dict(),
            "training": manifest,
            "metrics": metrics,
        }

    model.train()
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.task}", unit="step")
    running = None
    last_val: dict = {}
    while step < cfg.steps:
        hu_np, tgt_np, w_np = bank.sample(rng, cfg.batch, crop=cfg.crop, with_weights=True)
        hu = torch.from_numpy(hu_np).to(device).float()
        tgt = torch.from_numpy(tgt_np).to(device)
        weight = torch.from_numpy(w_np).to(device)
        if cfg.augment:
            # no rotation for the valid area: a rotated rectangle is not the box of the rotated lungs
            hu, tgt = augment(hu, tgt, gen, max_rot_deg=0.0 if cfg.task == "valid_area" else 8.0, jpeg=cfg.jpeg,
                               noise_hu=cfg.noise_hu, textured_noise=cfg.textured_noise)
        # hard-negative mining ramps in over the first 30 % of the steps: on an untrained net every
        # background pixel is "hard", and full weight from step 0 drives it to predict nothing
        hard = cfg.hard_negatives * min(1.0, step / max(1.0, 0.3 * cfg.steps))
        loss = bce_dice_loss(model.logits(hu), tgt, weight=weight, hard_negatives=hard)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        lv = float(loss.detach())
        running = lv if running is None else 0.95 * running + 0.05 * lv
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
        if step % cfg.val_every == 0 or step == cfg.steps:
            rec = {"step": step, "train_loss": running}
            if val_bank is not None:
                last_val = evaluate_bank(model, val_bank, device)
                rec.update(last_val)
            history.append(rec)
            logger.info("step %d %s", step, {k: round(v, 4) for k, v in rec.items()})
            score = rec.get("val_loss", running)
            if score < best:
                best = score
                _save(out / "best.ckpt", payload(rec))
            _save(out / "last.ckpt", payload(rec))
            (out / "history.json").write_text(json.dumps(history, indent=2))
    if bar is not None:
        bar.close()
    return {
        "task": cfg.task,
        "steps": step,
        "final": history[-1] if history else {},
        "best_val_loss": best,
        "last": str(out / "last.ckpt"),
        "best": str(out / "best.ckpt"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
