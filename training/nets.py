"""UNet++ networks of the valid-area and lesion models, wrapped so that the graph takes raw HU.

The exported graph is ``HU_SLICES`` INT16 ``[B, 1, 512, 512]`` -> ``PROB`` FP32 ``[B, 1, 512, 512]``;
everything between lives inside it::

    int16 HU -> float -> clip to the window -> scale to [0, 1] -> (lite) average-pool to the net's size
             -> UNet++ logits -> bilinear upsample to 512 -> sigmoid

Profiles
--------
``paper``  ResNet-50 encoder at 512 x 512, decoder (256, 128, 64, 32, 16): the paper's network (GPU).
``lite``   a CPU-sized UNet++ (encoder, depth, decoder widths and input size per task, chosen by the
           ONNX Runtime 2-thread measurements in ``docs/models/README.md``).

Training works on the low-resolution logits (:meth:`HUSegmenter.logits`) against targets pooled to the
same size; export wraps the whole thing (:meth:`HUSegmenter.forward`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from ctscreen.contracts import SLICE_SIZE

TASKS = ("valid_area", "lesion")
PROFILES = ("lite", "paper")


@dataclass(frozen=True)
class NetSpec:
    """Everything needed to rebuild a network (stored in every checkpoint and model card)."""

    encoder: str
    encoder_depth: int
    decoder_channels: tuple[int, ...]
    input_size: int
    window: tuple[float, float] = (-1350.0, 150.0)
    """HU window (low, high) mapped to [0, 1]; the lung window W 1500 / L -600 by default."""
    arch: str = "UnetPlusPlus"
    extra: dict = field(default_factory=dict)
    logit_offset: float = 0.0
    """Subtracted from the logits before the sigmoid of the exported graph: a calibration chosen on
    the validation split (``training.calibrate``) so that the paper's fixed 0.50 cut-off falls where
    the validation data put it. Training never sees it."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        d["window"] = list(self.window)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NetSpec:
        d = dict(d)
        d["decoder_channels"] = tuple(d["decoder_channels"])
        d["window"] = tuple(d["window"])
        return cls(**d)


SPECS: dict[tuple[str, str], NetSpec] = {
    ("valid_area", "lite"): NetSpec("mobilenet_v2", 3, (32, 16, 8), 128),
    ("lesion", "lite"): NetSpec("mobilenet_v2", 4, (48, 32, 16, 16), 256),
    ("valid_area", "paper"): NetSpec("resnet50", 5, (256, 128, 64, 32, 16), 512),
    ("lesion", "paper"): NetSpec("resnet50", 5, (256, 128, 64, 32, 16), 512),
}


def spec_for(task: str, profile: str) -> NetSpec:
    """The default :class:`NetSpec` of ``task`` (``valid_area``/``lesion``) and ``profile``."""
    if task not in TASKS:
        raise ValueError(f'Argument "task" must be one of {TASKS}, got {task!r}.')
    if profile not in PROFILES:
        raise ValueError(f'Argument "profile" must be one of {PROFILES}, got {profile!r}.')
    return SPECS[(task, profile)]


def parse_arch(text: str, task: str, profile: str) -> NetSpec:
    """A :class:`NetSpec` from ``ENCODER:DEPTH:W1,W2,...[@SIZE]`` (``ctscreen train --arch``), the
    profile's input size and HU window unless ``@SIZE`` is given.

    >>> parse_arch("mobilenet_v2:5:64,48,32,16,8", "lesion", "lite").decoder_channels
    (64, 48, 32, 16, 8)
    >>> parse_arch("timm-mobilenetv3_small_100:4:32,24,16,16@128", "lesion", "lite").input_size
    128
    """
    base = spec_for(task, profile)
    body, _, size = text.partition("@")
    parts = body.split(":")
    try:
        if len(parts) != 3 or not parts[0]:
            raise ValueError
        depth = int(parts[1])
        widths = tuple(int(w) for w in parts[2].split(","))
        input_size = int(size) if size else base.input_size
    except ValueError:
        raise ValueError(
            f'Argument "arch" must look like ENCODER:DEPTH:W1,W2,...[@SIZE], got {text!r}.'
        ) from None
    if len(widths) != depth or depth < 1 or min(widths) < 1:
        raise ValueError(
            f'Argument "arch" needs {depth} positive decoder widths (one per stage), got {text!r}.'
        )
    if input_size < 1 or SLICE_SIZE % input_size:
        raise ValueError(f'Argument "arch" input size must divide {SLICE_SIZE}, got {input_size}.')
    return replace(
        base, encoder=parts[0], encoder_depth=depth, decoder_channels=widths, input_size=input_size
    )


class HUSegmenter(nn.Module):
    """A UNet++ that takes raw HU slices and returns a probability map at 512 x 512.

    Parameters
    ----------
    spec : NetSpec
        Architecture, input size and HU window.
    """

    w_lo: torch.Tensor  # buffers (register_buffer in __init__)
    w_scale: torch.Tensor
    logit_offset: torch.Tensor

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        if SLICE_SIZE % spec.input_size:
            raise ValueError(
                f'Argument "spec.input_size" must divide {SLICE_SIZE}, got {spec.input_size}.'
            )
        if len(spec.decoder_channels) != spec.encoder_depth:
            raise ValueError(
                'Argument "spec.decoder_channels" must have one width per encoder stage '
                f"({spec.encoder_depth}), got {spec.decoder_channels}."
            )
        self.spec = spec
        self.pool = SLICE_SIZE // spec.input_size
        self.net = smp.create_model(
            spec.arch,
            encoder_name=spec.encoder,
            encoder_weights=None,
            encoder_depth=spec.encoder_depth,
            decoder_channels=tuple(spec.decoder_channels),
            in_channels=1,
            classes=1,
            **spec.extra,
        )
        lo, hi = spec.window
        self.register_buffer("w_lo", torch.tensor(float(lo)), persistent=False)
        self.register_buffer("w_scale", torch.tensor(1.0 / (float(hi) - float(lo))), persistent=False)
        self.register_buffer("logit_offset", torch.tensor(float(spec.logit_offset)), persistent=False)

    def prepare(self, hu: torch.Tensor) -> torch.Tensor:
        """Window, scale and pool HU ``[B, 1, 512, 512]`` (any dtype) to the net's input."""
        x = hu.to(torch.float32)
        lo = self.w_lo
        hi = lo + 1.0 / self.w_scale
        x = (torch.clamp(x, lo, hi) - lo) * self.w_scale
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        return x

    def logits(self, hu: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits ``[B, 1, S, S]`` (S = ``spec.input_size``) of HU slices."""
        return self.net(self.prepare(hu))

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        """Probability map ``[B, 1, 512, 512]`` of HU slices ``[B, 1, 512, 512]``."""
        z = self.logits(hu)
        if self.pool > 1:
            z = F.interpolate(z, scale_factor=float(self.pool), mode="bilinear", align_corners=False)
        return torch.sigmoid(z - self.logit_offset)


def build(task: str, profile: str, spec: NetSpec | None = None) -> HUSegmenter:
    """A fresh (untrained, no downloaded weights) network for ``task`` and ``profile``."""
    return HUSegmenter(spec or spec_for(task, profile))
