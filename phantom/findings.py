"""Findings: the COVID-19 pattern (the positive target) and the paper's hard negatives.

A finding is a union of soft-edged ellipsoids (``Blob``) and, for thin structures, a cloud of
spheres (spicules, fibrous streaks, dilated bronchi, air bronchograms). Each finding knows its
HU, its class and where its truth goes: ``lesion_mask`` for COVID findings, ``finding_mask``
(with the code of :data:`FINDING_CODES`) for everything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .anatomy import Patient, lower_lobe, lung_masks, sample_lung_points
from .trees import SphereCloud, sample_segments

FINDING_CODES: dict[str, int] = {
    "nodule": 1,
    "tb": 2,
    "bronchiectasis": 3,
    "bacterial": 4,
    "emphysema": 5,
    "stomach_bubble": 6,
    "bowel_gas": 7,
}
"""Values of ``Study.finding_mask`` (0 = no non-COVID finding)."""

COVID_SUBTYPES = ("ggo", "crazy_paving", "consolidation")

HU_RANGES: dict[str, tuple[float, float]] = {
    "ggo": (-750.0, -300.0),
    "crazy_paving": (-750.0, -150.0),
    "consolidation": (-100.0, 60.0),
    "nodule": (-20.0, 80.0),
    "tb_cavity_wall": (-50.0, 80.0),
    "bacterial": (-60.0, 60.0),
    "emphysema": (-1024.0, -930.0),
    "stomach_bubble": (-1024.0, -850.0),
}
"""Intended HU range of each finding's core (the median of its mask lies inside)."""


@dataclass
class Blob:
    x: float
    y: float
    z: float
    a: float
    b: float
    c: float
    angle: float


@dataclass
class Finding:
    """One finding; ``blobs`` are painted with ``hu`` (plus texture), ``holes`` with ``hole_hu``."""

    name: str
    subtype: str
    covid: bool
    side: str
    hu: float
    blobs: list[Blob] = field(default_factory=list)
    core: list[Blob] = field(default_factory=list)
    core_hu: float = 0.0
    tubes: SphereCloud | None = None
    tube_hu: float = 0.0
    lumens: SphereCloud | None = None
    lumen_hu: float = -1000.0
    texture: float = 0.0
    crazy: float = 0.0
    lobe: str | None = None
    z_range: tuple[float, float] | None = None

    @property
    def code(self) -> int:
        return 0 if self.covid else FINDING_CODES[self.name]

    def z_extent(self) -> tuple[float, float]:
        zs = [(b.z - b.c, b.z + b.c) for b in self.blobs + self.core]
        for cloud in (self.tubes, self.lumens):
            if cloud is not None and cloud.z.size:
                zs.append((float(cloud.z.min() - cloud.r.max()), float(cloud.z.max() + cloud.r.max())))
        if self.z_range is not None:
            zs.append(self.z_range)
        return min(z[0] for z in zs), max(z[1] for z in zs)

    def summary(self) -> dict:
        lo, hi = self.z_extent()
        return {
            "name": self.name,
            "subtype": self.subtype,
            "covid": self.covid,
            "side": self.side,
            "hu": round(float(self.hu if not self.core else self.core_hu), 1),
            "z_mm": [round(lo, 1), round(hi, 1)],
        }


# ---- placement helpers ---------------------------------------------------------------------
def _lung_point(p: Patient, rng, side: str, s_lo: float, s_hi: float, *, peripheral: float | None,
                posterior_bias: float = 0.0, tries: int = 400):
    """A point inside ``side`` lung; ``peripheral`` = depth (mm) under the pleura, or None."""
    for _ in range(tries):
        s = float(rng.uniform(s_lo, s_hi))
        cy, ac, bc = (float(v) for v in p.cavity(s))
        sign = -1.0 if side == "right" else 1.0
        if peripheral is not None:
            # polar angle from the lung centre: lateral/posterior/anterior, rarely medial
            theta = rng.uniform(-0.55 * np.pi, 0.55 * np.pi) + posterior_bias * rng.uniform(0, 0.6)
            ux, uy = np.cos(theta), np.sin(theta)
            # ray from the cavity centre of this side to the cavity outline
            x0, y0 = sign * 0.45 * ac, cy
            t = _ray_to_ellipse(x0, y0 - cy, sign * ux, uy, ac, bc)
            depth = peripheral
            x = x0 + sign * ux * (t - depth)
            y = y0 + uy * (t - depth)
        else:
            x = sign * rng.uniform(0.2, 0.8) * ac
            y = cy + rng.uniform(-0.7, 0.7) * bc
        r, left = lung_masks(p, np.float32(x), np.float32(y), np.float32(s))
        inside = bool(r) if side == "right" else bool(left)
        if inside:
            return x, y, s
    raise RuntimeError("could not place a finding inside the lung")


def _ray_to_ellipse(x0, y0, ux, uy, a, b):
    """Distance along (ux, uy) from (x0, y0) (ellipse-centred coords) to the ellipse outline."""
    qa = (ux / a) ** 2 + (uy / b) ** 2
    qb = 2 * (x0 * ux / a**2 + y0 * uy / b**2)
    qc = (x0 / a) ** 2 + (y0 / b) ** 2 - 1
    return (-qb + np.sqrt(max(qb * qb - 4 * qa * qc, 0.0))) / (2 * qa)


def _blobs_around(rng, x, y, z, a, b, c, angle, n_extra) -> list[Blob]:
    blobs = [Blob(x, y, z, a, b, c, angle)]
    for _ in range(n_extra):
        f = rng.uniform(0.45, 0.8)
        blobs.append(
            Blob(
                x + rng.uniform(-0.7, 0.7) * a,
                y + rng.uniform(-0.5, 0.5) * b,
                z + rng.uniform(-0.6, 0.6) * c,
                a * f,
                b * rng.uniform(0.5, 0.9),
                c * rng.uniform(0.6, 0.9),
                angle + rng.uniform(-0.5, 0.5),
            )
        )
    return blobs


# ---- COVID-19 ---------------------------------------------------------------------------------
def covid_findings(p: Patient, rng, step: float, stage: str | None = None) -> tuple[list[Finding], str]:
    """Multifocal, bilateral, peripheral/subpleural GGO, crazy paving and consolidation."""
    stage = stage or str(rng.choice(["early", "progressive", "peak"], p=[0.4, 0.35, 0.25]))
    weights = {
        "early": [0.8, 0.2, 0.0],
        "progressive": [0.45, 0.35, 0.2],
        "peak": [0.3, 0.3, 0.4],
    }[stage]
    n = int(rng.integers(4, 11))
    out = []
    zmin = 2.4 * step  # every lesion spans >= 4 slices
    for i in range(n):
        side = ("right", "left")[i % 2] if i < 2 else str(rng.choice(["right", "left"]))
        subtype = str(rng.choice(COVID_SUBTYPES, p=weights))
        s_lo = p.apex_s + 0.1
        s_hi = (p.dome_r_s if side == "right" else p.dome_l_s) + 0.02
        depth = float(rng.uniform(6.0, 14.0))
        # lower-zone predominance: draw the level from a distribution skewed towards the bases
        s_mid = s_lo + (s_hi - s_lo) * float(rng.beta(2.2, 1.2))
        x, y, s = _lung_point(p, rng, side, max(s_mid - 0.03, s_lo), min(s_mid + 0.03, s_hi),
                              peripheral=depth, posterior_bias=1.0)
        a = float(rng.uniform(16.0, 40.0))
        b = float(a * rng.uniform(0.5, 0.8))
        c = max(float(rng.uniform(12.0, 30.0)), zmin)
        cy = float(p.cavity(s)[0])
        angle = float(np.arctan2(y - cy, x - np.sign(x) * 0.45 * float(p.cavity(s)[1]))) + np.pi / 2
        blobs = _blobs_around(rng, x, y, s * p.length, a, b, c, angle, int(rng.integers(1, 4)))
        f = Finding(
            name="covid",
            subtype=subtype,
            covid=True,
            side=side,
            hu=float(rng.uniform(-680.0, -470.0)),
            blobs=blobs,
            texture=float(rng.uniform(20.0, 45.0)),
        )
        if subtype == "crazy_paving":
            f.hu = float(rng.uniform(-640.0, -500.0))
            f.crazy = float(rng.uniform(150.0, 230.0))
        if subtype == "consolidation":
            # patchy consolidation: a few smaller, irregular clumps inside the ground glass
            f.core = []
            for bl in blobs[:3]:
                for _ in range(int(rng.integers(1, 3))):
                    f.core.append(Blob(bl.x + rng.uniform(-0.35, 0.35) * bl.a, bl.y + rng.uniform(-0.3, 0.3) * bl.b,
                                       bl.z + rng.uniform(-0.15, 0.15) * bl.c, bl.a * rng.uniform(0.3, 0.5),
                                       bl.b * rng.uniform(0.35, 0.55), 0.7 * bl.c,
                                       bl.angle + rng.uniform(-0.6, 0.6)))
            f.core_hu = float(rng.uniform(-20.0, 40.0))
            f.lumens = _bronchograms(rng, blobs[0], n=int(rng.integers(2, 5)))
            f.lumen_hu = -930.0
        out.append(f)
    return out, stage


def _bronchograms(rng, blob: Blob, n: int) -> SphereCloud:
    """Short branching air tubes inside a consolidation."""
    p0, p1 = [], []
    for _ in range(n):
        start = np.array([blob.x, blob.y, blob.z]) + rng.normal(0, [0.3 * blob.a, 0.3 * blob.b, 0.2 * blob.c])
        direction = rng.normal(0, 1, 3)
        direction[2] *= 0.3
        direction /= np.linalg.norm(direction)
        length = rng.uniform(0.5, 0.9) * blob.a
        end = start + direction * length
        p0.append(start)
        p1.append(end)
        # one side branch
        mid = start + direction * length * 0.5
        d2 = direction + rng.normal(0, 0.8, 3)
        d2[2] *= 0.3
        p0.append(mid)
        p1.append(mid + d2 / np.linalg.norm(d2) * length * 0.4)
    return sample_segments(np.array(p0), np.array(p1), 1.6, 1.0, tag=5)


# ---- hard negatives -----------------------------------------------------------------------------
def nodule_findings(p: Patient, rng, step: float) -> list[Finding]:
    """Solitary nodule or spiculated tumour."""
    side = str(rng.choice(["right", "left"]))
    spiculated = bool(rng.random() < 0.5)
    x, y, s = _lung_point(p, rng, side, p.apex_s + 0.12, 0.6, peripheral=float(rng.uniform(18.0, 45.0)))
    r = float(rng.uniform(10.0, 18.0) if spiculated else rng.uniform(6.0, 14.0))
    c = max(r, 1.7 * step)
    f = Finding("nodule", "spiculated" if spiculated else "solid", False, side, float(rng.uniform(15.0, 50.0)),
                blobs=_blobs_around(rng, x, y, s * p.length, r, r * rng.uniform(0.8, 1.0), c, 0.0,
                                    int(rng.integers(0, 3)) if spiculated else 0))
    if spiculated:
        k = int(rng.integers(10, 20))
        d = rng.normal(0, 1, (k, 3))
        d[:, 2] *= 0.6
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        centre = np.array([x, y, s * p.length])
        p0 = centre + d * r * 0.8
        p1 = centre + d * (r + rng.uniform(6.0, 18.0, (k, 1)))
        f.tubes = sample_segments(p0, p1, 1.1, 0.45, tag=6)
        f.tube_hu = f.hu
    return [f]


def tb_findings(p: Patient, rng, step: float) -> list[Finding]:
    """Apical fibrous streaks, small (some calcified) nodules and often a cavity."""
    out = []
    sides = ["right", "left"] if rng.random() < 0.4 else [str(rng.choice(["right", "left"]))]
    for side in sides:
        p0, p1 = [], []
        for _ in range(int(rng.integers(8, 15))):
            x, y, s = _lung_point(p, rng, side, p.apex_s + 0.04, p.apex_s + 0.16, peripheral=float(rng.uniform(4, 15)))
            a = np.array([x, y, s * p.length])
            hil = np.array([np.sign(x) * 0.25 * p.body_a, p.body_cy, (p.arch_s + 0.1) * p.length])
            b = a + (hil - a) * rng.uniform(0.25, 0.5) + rng.normal(0, 4, 3)
            p0.append(a)
            p1.append(b)
        streaks = sample_segments(np.array(p0), np.array(p1), float(rng.uniform(1.4, 2.2)), 0.9, tag=7)
        f = Finding("tb", "fibrous_streaks", False, side, 30.0, tubes=streaks, tube_hu=float(rng.uniform(0.0, 50.0)))
        # tree-in-bud / calcified nodules
        for _ in range(int(rng.integers(5, 11))):
            x, y, s = _lung_point(p, rng, side, p.apex_s + 0.05, p.apex_s + 0.2, peripheral=float(rng.uniform(5, 25)))
            r = float(rng.uniform(2.5, 5.5))
            f.blobs.append(Blob(x, y, s * p.length, r, r, max(r, 1.2 * step), 0.0))
        out.append(f)
        if rng.random() < 0.75:
            x, y, s = _lung_point(p, rng, side, p.apex_s + 0.08, p.apex_s + 0.18, peripheral=float(rng.uniform(18, 28)))
            r = float(rng.uniform(11.0, 20.0))
            wall = float(rng.uniform(3.0, 6.0))
            cav = Finding("tb", "cavity", False, side, float(rng.uniform(20.0, 45.0)),
                          blobs=[Blob(x, y, s * p.length, r, r * 0.9, max(r, 1.8 * step), float(rng.uniform(0, 3)))])
            cav.core = [Blob(x, y, s * p.length, r - wall, r * 0.9 - wall, max(r - wall, 1.2 * step), cav.blobs[0].angle)]
            cav.core_hu = -1000.0
            out.append(cav)
    return out


def bronchiectasis_findings(p: Patient, rng, step: float) -> list[Finding]:
    """Dilated, thick-walled bronchi (tram tracks, signet rings) in the lower lobes."""
    out = []
    for side in (["right", "left"] if rng.random() < 0.6 else [str(rng.choice(["right", "left"]))]):
        p0, p1, rad = [], [], []
        base = p.dome_r_s if side == "right" else p.dome_l_s
        for _ in range(int(rng.integers(4, 9))):
            x, y, s = _lung_point(p, rng, side, base - 0.25, base - 0.04, peripheral=float(rng.uniform(25, 45)))
            a = np.array([x, y, s * p.length])
            d = rng.normal(0, 1, 3)
            d[2] = abs(d[2]) * 0.8
            d /= np.linalg.norm(d)
            length = rng.uniform(25.0, 55.0)
            p0.append(a)
            p1.append(a + d * length)
            rad.append(rng.uniform(2.5, 5.0))
        radii = np.array(rad)
        wall_t = rng.uniform(1.3, 2.2)
        f = Finding("bronchiectasis", "cylindrical", False, side, 35.0,
                    tubes=sample_segments(np.array(p0), np.array(p1), radii + wall_t, radii * 1.1 + wall_t, tag=8),
                    tube_hu=float(rng.uniform(20.0, 50.0)),
                    lumens=sample_segments(np.array(p0), np.array(p1), radii, radii * 1.1, tag=9), lumen_hu=-1000.0)
        out.append(f)
    return out


def bacterial_findings(p: Patient, rng, step: float) -> list[Finding]:
    """Lobar consolidation: one lobe, homogeneous, bounded by the fissure, air bronchograms."""
    lobe = str(rng.choice(["right_lower", "left_lower", "right_upper"], p=[0.45, 0.35, 0.2]))
    side = lobe.split("_")[0]
    if lobe.endswith("lower"):
        z0 = (p.fissure_s + 0.05) * p.length
        z1 = (p.dome_l_s + 0.2) * p.length
    else:
        z0 = (p.apex_s + 0.05) * p.length
        z1 = (p.dome_r_s - 0.05) * p.length
    # air bronchograms: a few branching air tubes running from the hilum into the lobe
    pts = sample_lung_points(p, rng, 600, side)
    lower = lower_lobe(p, pts[:, 0], pts[:, 1], pts[:, 2] / p.length)
    inside = pts[lower] if lobe.endswith("lower") else pts[~lower]
    inside = inside[(inside[:, 2] > z0) & (inside[:, 2] < z1)]
    centre = inside.mean(axis=0)
    k = min(int(rng.integers(5, 9)), len(inside))
    ends = inside[rng.choice(len(inside), size=k, replace=False)]
    starts = centre + (ends - centre) * 0.1
    mids = starts + (ends - starts) * 0.5
    twigs = mids + rng.normal(0.0, 12.0, mids.shape)
    lumens = sample_segments(np.concatenate([starts, mids]), np.concatenate([ends, twigs]),
                             float(rng.uniform(2.4, 3.2)), 1.2, tag=5)
    return [Finding("bacterial", "lobar", False, side, float(rng.uniform(20.0, 45.0)), lobe=lobe,
                    z_range=(z0, z1), texture=10.0, lumens=lumens, lumen_hu=-950.0)]


def emphysema_findings(p: Patient, rng, step: float) -> list[Finding]:
    """Centrilobular lucencies in the upper zones and a few subpleural bullae."""
    out = []
    for side in ("right", "left"):
        f = Finding("emphysema", "centrilobular", False, side, -990.0)
        for _ in range(int(rng.integers(120, 220))):
            x, y, s = _lung_point(p, rng, side, p.apex_s + 0.03, 0.6, peripheral=None)
            r = float(rng.uniform(2.5, 7.0))
            f.blobs.append(Blob(x, y, s * p.length, r, r * rng.uniform(0.7, 1.0), max(r, 0.9 * step), float(rng.uniform(0, 3))))
        for _ in range(int(rng.integers(1, 4))):
            x, y, s = _lung_point(p, rng, side, p.apex_s + 0.05, 0.45, peripheral=float(rng.uniform(8, 14)))
            r = float(rng.uniform(10.0, 22.0))
            f.blobs.append(Blob(x, y, s * p.length, r, r * 0.8, max(r, 1.8 * step), float(rng.uniform(0, 3))))
        out.append(f)
    return out


HARD_NEGATIVES = {
    "nodule": nodule_findings,
    "tb": tb_findings,
    "bronchiectasis": bronchiectasis_findings,
    "bacterial": bacterial_findings,
    "emphysema": emphysema_findings,
}


def lobe_mask(p: Patient, lobe: str, x, y, s):
    right, left = lung_masks(p, x, y, s)
    lung = right if lobe.startswith("right") else left
    lower = lower_lobe(p, x, y, s)
    return lung & (lower if lobe.endswith("lower") else ~lower)
