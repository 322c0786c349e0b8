"""Analytic chest anatomy: per-patient parameters and shape functions of (x, y, s).

Coordinates
-----------
``x``  mm, patient right (-) to left (+)   = DICOM patient x (image columns grow with x)
``y``  mm, anterior (-) to posterior (+)   = DICOM patient y (image rows grow with y)
``s``  0 at the top of the scanned range (thoracic inlet) to 1 at the bottom (upper abdomen);
       the anatomical cranio-caudal position is ``za = s * patient.length`` mm (down).

Every shape function broadcasts: called with ``x`` of shape (1, W), ``y`` of shape (H, 1) and a
scalar ``s`` it returns an (H, W) mask for one slice (the per-axis terms are computed on the 1-D
vectors, so an ellipse costs two full-grid operations); called with 1-D point arrays it tests
3-D points (used to seed the vessel trees inside the lungs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HU = {
    "air": -1000.0,
    "lung": -860.0,
    "fat": -95.0,
    "skin": 25.0,
    "muscle": 50.0,
    "blood": 42.0,
    "heart": 40.0,
    "liver": 60.0,
    "spleen": 48.0,
    "stomach": 18.0,
    "cortical": 650.0,
    "marrow": 230.0,
    "disc": 85.0,
    "cartilage": 120.0,
    "csf": 20.0,
    "table_shell": 220.0,
    "table_foam": -920.0,
    "airway_wall": 30.0,
    "vessel": 40.0,
}


@dataclass(frozen=True)
class Patient:
    """Per-study anatomical parameters (all lengths in mm, ``*_s`` in scan fraction)."""

    length: float
    body_a: float
    body_b: float
    body_cy: float
    fat: float
    muscle: float
    apex_s: float
    dome_r_s: float
    dome_l_s: float
    lung_k: float
    heart_scale: float
    heart_angle: float
    arch_s: float
    vertebra_pitch: float
    vertebra_phase: float
    rib_pitch: float
    rib_start: float
    parenchyma: float
    female: bool
    table_gap: float
    fissure_s: float
    mediastinum_w: float

    # ---- cross-section sizes -------------------------------------------------------------
    def body_axes(self, s):
        """Half-width and half-depth of the body outline at ``s``."""
        g = 0.80 + 0.20 * _smooth(np.asarray(s, dtype=np.float32), 0.0, 0.35)
        return self.body_a * g, self.body_b * (0.86 + 0.14 * _smooth(np.asarray(s, np.float32), 0.0, 0.4))

    def body_centre(self, s):
        """Body centre y at ``s``: the back lies on the table, so the centre moves with the depth."""
        return self.body_cy + (self.body_b - self.body_axes(s)[1])

    def cavity(self, s):
        """Thoracic cavity (inside the ribs): centre y, half-width, half-depth at ``s``."""
        a, b = self.body_axes(s)
        ac = a - self.fat - self.muscle - 9.0
        bc = b - 0.6 * self.fat - self.muscle - 16.0
        cy = self.body_centre(s) - 12.0
        return cy, ac, bc

    def spine(self, s):
        """Vertebral body centre y and radius at ``s``."""
        cy, ac, bc = self.cavity(s)
        r = 15.0 + 5.0 * np.asarray(s, np.float32)
        return cy + bc - 0.9 * r, r


def _smooth(v, lo, hi):
    t = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def sample_patient(rng: np.random.Generator) -> Patient:
    """Draw one patient."""
    body_a = float(rng.uniform(135.0, 185.0))
    dome_r = float(rng.uniform(0.66, 0.73))
    return Patient(
        length=float(rng.uniform(290.0, 350.0)),
        body_a=body_a,
        body_b=float(body_a * rng.uniform(0.62, 0.74)),
        body_cy=float(rng.uniform(-8.0, 8.0)),
        fat=float(rng.uniform(6.0, 30.0)),
        muscle=float(rng.uniform(7.0, 13.0)),
        apex_s=float(rng.uniform(0.03, 0.08)),
        dome_r_s=dome_r,
        dome_l_s=dome_r + float(rng.uniform(0.02, 0.05)),
        lung_k=float(rng.uniform(0.13, 0.19)),
        heart_scale=float(rng.uniform(0.9, 1.1)),
        heart_angle=float(rng.uniform(-0.6, -0.35)),
        arch_s=float(rng.uniform(0.24, 0.3)),
        vertebra_pitch=float(rng.uniform(24.0, 29.0)),
        vertebra_phase=float(rng.uniform(0.0, 30.0)),
        rib_pitch=float(rng.uniform(21.0, 25.0)),
        rib_start=float(rng.uniform(-25.0, -5.0)),
        parenchyma=float(rng.uniform(-880.0, -830.0)),
        female=bool(rng.random() < 0.5),
        table_gap=float(rng.uniform(1.0, 6.0)),
        fissure_s=float(rng.uniform(0.3, 0.36)),
        mediastinum_w=float(rng.uniform(0.9, 1.1)),
    )


# ---- lungs ---------------------------------------------------------------------------------
def lung_masks(p: Patient, x, y, s):
    """Right and left lung membership (bool, broadcast of x, y, s)."""
    s = np.asarray(s, dtype=np.float32)
    cy, ac, bc = p.cavity(s)
    ex = (x / ac) ** 2
    ey = ((y - cy) / bc) ** 2
    inside = (ex + ey) < 1.0
    # mediastinum: a band around the midline, widening at the arch and holding the heart lower down
    wm = p.mediastinum_w * (16.0 + 16.0 * _smooth(s, 0.05, 0.3)) * (ac / 115.0)
    # below the hila the heart fills the middle; only a narrow band stays (oesophagus, aorta)
    wm = wm * (1.0 - 0.45 * _smooth(s, p.arch_s + 0.12, p.arch_s + 0.22))
    xm = 4.0
    # widest at the great vessels / hila, narrow at the anterior junction and behind the heart
    t = (y - (cy - 0.1 * bc)) / (1.1 * bc)
    med = (np.abs(x - xm) < wm * (1.0 - 0.75 * t * t)) & (np.abs(t) < 1.0)
    vy, vr = p.spine(s)
    spine = ((x / (vr + 9.0)) ** 2 + ((y - vy) / (vr + 7.0)) ** 2) < 1.0
    lungs = inside & ~med & ~spine & ~heart_mask(p, x, y, s, margin=5.0)
    # apex domes and diaphragm domes, one per side
    xa = 0.45 * ac
    ya = cy + 0.1 * bc
    xr = ((x + xa) / ac) ** 2
    xl = ((x - xa) / ac) ** 2
    ya_term = ((y - ya) / bc) ** 2
    yd = cy - 0.2 * bc
    yd_term = ((y - yd) / bc) ** 2
    apex = 0.3
    right = lungs & (x < xm) & (s > p.apex_s + apex * (xr + ya_term))
    left = lungs & (x >= xm) & (s > p.apex_s + apex * (xl + ya_term))
    right &= s < np.minimum(p.dome_r_s + p.lung_k * (xr + yd_term), 0.93)
    left &= s < np.minimum(p.dome_l_s + p.lung_k * (xl + yd_term), 0.93)
    return right, left


def below_dome(p: Patient, x, y, s):
    """Right and left regions under the diaphragm domes (inside the cavity outline)."""
    s = np.asarray(s, dtype=np.float32)
    cy, ac, bc = p.cavity(s)
    xa = 0.45 * ac
    yd_term = ((y - (cy - 0.2 * bc)) / bc) ** 2
    right = s >= np.minimum(p.dome_r_s + p.lung_k * (((x + xa) / ac) ** 2 + yd_term), 0.93)
    left = s >= np.minimum(p.dome_l_s + p.lung_k * (((x - xa) / ac) ** 2 + yd_term), 0.93)
    return right & (x < 4.0), left & (x >= 4.0)


def lower_lobe(p: Patient, x, y, s):
    """Points behind/below the oblique fissure (the lower lobes)."""
    s = np.asarray(s, dtype=np.float32)
    cy, ac, bc = p.cavity(s)
    return s > fissure_s(p, x, y, cy, ac, bc)


def fissure_s(p: Patient, x, y, cy, ac, bc):
    """Scan fraction of the oblique fissure surface at (x, y)."""
    t = np.clip((cy + bc - y) / (2.0 * bc), 0.0, 1.0)  # 0 posterior, 1 anterior
    lateral = (np.abs(x) / ac) ** 2
    return p.fissure_s + (p.dome_r_s - p.fissure_s + 0.02) * t - 0.12 * np.sqrt(lateral)


def heart_geometry(p: Patient, s):
    """Heart ellipse centre, semi-axes (mm) at ``s``; semi-axes 0 outside the heart."""
    s = np.asarray(s, dtype=np.float32)
    cy, ac, bc = p.cavity(s)
    bottom = p.dome_r_s + 0.015
    top = p.arch_s + 0.17
    t = np.clip((s - top) / max(bottom - top, 1e-3), 0.0, 1.0)
    # round top, full width down to the diaphragm, then a short taper under the dome
    scale = np.sqrt(1.0 - (1.0 - t) ** 2)
    scale = np.where(s > bottom, np.clip(1.0 - (s - bottom) / 0.03, 0.0, 1.0), scale)
    scale = np.where(s < top, 0.0, scale).astype(np.float32)
    hx = 0.12 * ac + 10.0
    hy = cy - 0.2 * bc
    ha = 0.47 * ac * p.heart_scale * scale
    hb = 0.4 * bc * p.heart_scale * scale
    return hx, hy, ha, hb


def heart_mask(p: Patient, x, y, s, margin: float = 0.0):
    hx, hy, ha, hb = heart_geometry(p, s)
    ca, sa = np.cos(p.heart_angle), np.sin(p.heart_angle)
    dx, dy = x - hx, y - hy
    u = (dx * ca + dy * sa) / (ha + margin + 1e-3)
    v = (-dx * sa + dy * ca) / (hb + margin + 1e-3)
    return ((u * u + v * v) < 1.0) & (ha > 0)


def sample_lung_points(p: Patient, rng: np.random.Generator, n: int, side: str) -> np.ndarray:
    """Uniform random 3-D points (x, y, za) inside one lung."""
    out = []
    got = 0
    lim_a = p.body_a
    while got < n:
        m = 4 * n
        x = rng.uniform(-lim_a, lim_a, m).astype(np.float32)
        y = rng.uniform(p.body_cy - p.body_b, p.body_cy + p.body_b, m).astype(np.float32)
        s = rng.uniform(0.0, 1.0, m).astype(np.float32)
        r, left = lung_masks(p, x, y, s)
        keep = r if side == "right" else left
        pts = np.stack([x[keep], y[keep], s[keep] * p.length], axis=1)
        out.append(pts)
        got += len(pts)
    return np.concatenate(out)[:n]
