"""Per-slice renderer: cuts the analytic patient, its trees and findings with one slice plane.

Only a window around the body and the table is computed with full-grid operations; small
structures (vessels, ribs, lesions) are painted in their own bounding windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import anatomy as an
from .anatomy import HU, Patient
from .findings import FINDING_CODES, Blob, Finding, lobe_mask
from .raster import ellipse_weight, splat_discs
from .trees import LungTrees, SphereCloud, sample_segments

BUBBLE = FINDING_CODES["stomach_bubble"]
BOWEL = FINDING_CODES["bowel_gas"]


@dataclass
class Frame:
    """Pixel grid of one study: ``x = x0 + col * ps``, ``y = y0 + row * ps`` (mm)."""

    rows: int
    cols: int
    ps: float
    x0: float
    y0: float

    @property
    def xs(self) -> np.ndarray:
        return (self.x0 + np.arange(self.cols) * self.ps).astype(np.float32)

    @property
    def ys(self) -> np.ndarray:
        return (self.y0 + np.arange(self.rows) * self.ps).astype(np.float32)

    def col(self, x):
        return (np.asarray(x, np.float32) - self.x0) / self.ps

    def row(self, y):
        return (np.asarray(y, np.float32) - self.y0) / self.ps


def build_skeleton(p: Patient, rng: np.random.Generator) -> SphereCloud:
    """Ribs (cortex, marrow, costal cartilage) and clavicles as sphere clouds (tags 10/11/12)."""
    p0, p1, r0, tags = [], [], [], []
    for side in (-1.0, 1.0):
        for i in range(12):
            z_head = p.rib_start + (i + 1) * p.rib_pitch
            phi1 = np.pi * (0.9 if i < 7 else 0.9 - 0.06 * (i - 6))
            phi = np.linspace(0.1 * np.pi, phi1, 120)
            t = (phi - phi[0]) / (phi1 - phi[0])
            drop = 70.0 + 2.0 * i
            za = z_head + drop * t**1.6
            s = za / p.length
            cy, ac, bc = p.cavity(np.clip(s, 0.0, 1.0))
            x = side * (ac + 4.0) * np.sin(phi)
            y = cy + (bc + 4.0) * np.cos(phi)
            pts = np.stack([x, y, za], axis=1)
            cart = t > (0.82 if i < 7 else 0.9)
            for part, tag in ((~cart, 10), (cart, 12)):
                idx = np.flatnonzero(part)
                if idx.size < 2:
                    continue
                p0.append(pts[idx[:-1]])
                p1.append(pts[idx[1:]])
                r0.append(np.full(idx.size - 1, 5.0 if tag == 10 else 4.0))
                tags.append(np.full(idx.size - 1, tag))
        # clavicle
        a, b = p.body_axes(0.02)
        cyb = p.body_centre(0.02)
        p0.append(np.array([[side * 18.0, cyb - 0.8 * b, 0.02 * p.length]]))
        p1.append(np.array([[side * 0.75 * a, cyb - 0.35 * b, 0.0]]))
        r0.append(np.array([7.0]))
        tags.append(np.array([10]))
    p0, p1, r0, tags = (np.concatenate(v) for v in (p0, p1, r0, tags))
    cortex = sample_segments(p0, p1, r0, r0, tag=tags)
    bone = tags == 10
    marrow = sample_segments(p0[bone], p1[bone], r0[bone] - 2.0, r0[bone] - 2.0, tag=11)
    return SphereCloud.concat([cortex, marrow])


def _paint(view, res, value, where=None) -> None:
    """Set ``value`` inside a hard shape given as ``(window, weight)`` from :func:`ellipse_weight`."""
    if res is None:
        return
    sl, w = res
    m = w > 0.5
    if where is not None:
        m &= where[sl]
    view[sl][m] = value


class Renderer:
    """Renders slice ``s`` of one study into HU (float32) plus its truth masks."""

    def __init__(self, p: Patient, frame: Frame, trees: LungTrees, skeleton: SphereCloud,
                 findings: list[Finding], gut: list[Blob], *, half_slab: float, fissures: bool,
                 texture_bank: np.ndarray, rng: np.random.Generator):
        self.p = p
        self.f = frame
        self.trees = trees
        self.skeleton = skeleton
        self.findings = findings
        self.gut = gut
        self.half_slab = half_slab
        self.fissures = fissures
        self.tex = texture_bank
        self.xs, self.ys = frame.xs, frame.ys
        self.pre = [f for f in findings if f.covid or f.name == "bacterial"]
        self.post = [f for f in findings if not (f.covid or f.name == "bacterial")]
        self.parenchyma_shift = -35.0 if any(f.name == "emphysema" for f in findings) else 0.0
        stomach_s = p.dome_l_s + 0.075
        cy, ac, bc = (float(v) for v in p.cavity(stomach_s))
        self.stomach = Blob(0.42 * ac, cy - 0.2 * bc, stomach_s * p.length, 0.3 * ac, 0.33 * bc, 0.1 * p.length,
                            float(rng.uniform(0.3, 0.7)))
        self.stomach_level = float(rng.uniform(0.25, 0.5))

    # ---- helpers ------------------------------------------------------------------------------
    def _ellipse(self, view, win0, x, y, a, b, angle, value, where=None):
        """Paint a hard ellipse given in mm into ``view`` (window origin ``win0`` in pixels)."""
        r0, c0 = win0
        _paint(view, ellipse_weight(view.shape, float(self.f.col(x)) - c0, float(self.f.row(y)) - r0,
                                    a / self.f.ps, b / self.f.ps, angle, 1e-3), value, where)

    def _discs(self, canvas, x, y, r, value, **kw):
        splat_discs(canvas, self.f.col(x), self.f.row(y), np.asarray(r, np.float32) / self.f.ps, value, **kw)

    def _cut(self, cloud: SphereCloud, za: float):
        return cloud.cut(za, self.half_slab)

    # ---- one slice ----------------------------------------------------------------------------
    def render(self, s: float):
        p, f = self.p, self.f
        za = float(s) * p.length
        hu = np.full((f.rows, f.cols), HU["air"], np.float32)
        lung_full = np.zeros((f.rows, f.cols), bool)
        lesion = np.zeros((f.rows, f.cols), bool)
        finding = np.zeros((f.rows, f.cols), np.uint8)

        a_b, b_b = (float(v) for v in p.body_axes(s))
        cyb = float(p.body_centre(s))
        table_y = p.body_cy + p.body_b + p.table_gap
        top = cyb - b_b - (40.0 if p.female else 6.0)
        r0 = int(np.clip(np.floor(f.row(top)), 0, f.rows))
        r1 = int(np.clip(np.ceil(f.row(table_y + 45.0)) + 1, 0, f.rows))
        c0 = int(np.clip(np.floor(f.col(-max(a_b, 240.0) - 5.0)), 0, f.cols))
        c1 = int(np.clip(np.ceil(f.col(max(a_b, 240.0) + 5.0)) + 1, 0, f.cols))
        if r0 >= r1 or c0 >= c1:
            return hu, lung_full, lesion, finding
        view = hu[r0:r1, c0:c1]
        win0 = (r0, c0)
        x = self.xs[None, c0:c1]
        y = self.ys[r0:r1, None]

        # table: carbon shells around a foam core, slightly concave
        ty = y - (table_y - 0.0006 * x * x)
        on_table = np.abs(x) < 235.0
        view[((ty >= 0) & (ty < 2.5) | (ty >= 38) & (ty < 40.5)) & on_table] = HU["table_shell"]
        view[(ty >= 2.5) & (ty < 38) & on_table] = HU["table_foam"]

        # body wall: skin, fat, muscle
        def oval(a, b, cy):
            dy = (y - cy) / b
            return (x / a) ** 2 + np.where(dy > 0, np.abs(dy) ** 3, dy * dy) < 1.0

        body = oval(a_b, b_b, cyb)
        view[body] = HU["skin"]
        view[oval(a_b - 2.0, b_b - 2.0, cyb)] = HU["fat"]
        if p.female and 0.4 < s < 0.78:
            k = np.sin(np.pi * (s - 0.4) / 0.38)
            for side in (-1, 1):
                self._ellipse(view, win0, side * 0.45 * a_b, cyb - 0.82 * b_b, 58 * k + 1, 34 * k + 1, side * 0.3, HU["fat"])
                self._ellipse(view, win0, side * 0.45 * a_b, cyb - 0.86 * b_b, 30 * k + 1, 14 * k + 1, side * 0.3, 5.0)
        mus_a, mus_b = a_b - 2.0 - p.fat, b_b - 2.0 - 0.6 * p.fat
        inner_fat = oval(a_b - 2.0 - 0.4 * p.fat, b_b - 2.0 - 0.3 * p.fat, cyb)
        view[oval(mus_a, mus_b, cyb)] = HU["muscle"]
        vy, vr = (float(v) for v in p.spine(s))
        if s < 0.62:  # pectoral muscles
            for side in (-1, 1):
                self._ellipse(view, win0, side * 0.42 * a_b, cyb - 0.8 * b_b, 0.36 * a_b, 9.0 + 0.07 * b_b,
                              side * 0.35, HU["muscle"], where=inner_fat)
        for side in (-1, 1):  # paraspinal muscles
            self._ellipse(view, win0, side * (vr + 16.0), vy + vr + 26.0, 27.0, 22.0, 0.0, HU["muscle"], where=body)
        if 0.02 < s < 0.45:  # scapulae with their muscles
            for side in (-1, 1):
                cx_, cy_ = side * 0.66 * a_b, cyb + 0.45 * b_b
                self._ellipse(view, win0, cx_, cy_, 0.3 * a_b, 16.0, -side * 0.55, HU["muscle"], where=body)
                self._ellipse(view, win0, cx_, cy_, 0.27 * a_b, 3.5, -side * 0.55, 520.0, where=body)

        cy, ac, bc = (float(v) for v in p.cavity(s))
        cavity = (x / ac) ** 2 + ((y - cy) / bc) ** 2 < 1.0
        view[cavity] = HU["fat"]

        # abdomen under the domes
        sub_r, sub_l = an.below_dome(p, x, y, s)
        sub_r &= cavity
        sub_l &= cavity
        abdomen = sub_r | sub_l
        if abdomen.any():
            liver_edge = 4.0 + 50.0 * np.clip((cy - y) / bc, 0.0, 1.0) * np.clip((s - p.dome_r_s) / 0.1, 0.0, 1.0)
            liver = sub_r | (sub_l & (x < liver_edge))
            liv = HU["liver"]
            view[liver] = liv
            sp_s = p.dome_l_s + 0.06
            self._blob_cut(view, win0, Blob(0.62 * ac, cy + 0.45 * bc, sp_s * p.length, 0.25 * ac, 0.3 * bc, 0.08 * p.length, 0.9),
                           za, HU["spleen"], where=sub_l)
            if s > 0.9:
                for side in (-1, 1):
                    self._ellipse(view, win0, side * 0.42 * ac, vy - 2.0, 0.17 * ac, 0.2 * bc, side * 0.7,
                                  32.0, where=abdomen)
            # stomach with its air bubble (air rises anteriorly in a supine patient)
            st = self.stomach
            res = self._blob_window(view.shape, win0, st, za, 0.0)
            if res is not None:
                sl, w = res
                inside = (w > 0) & sub_l[sl]
                view[sl][inside] = HU["muscle"]
                scale = np.sqrt(max(1.0 - ((za - st.z) / st.c) ** 2, 0.0))
                res2 = self._blob_window(view.shape, win0, Blob(st.x, st.y, st.z, st.a - 4, st.b - 4, st.c - 4, st.angle), za, 0.0)
                if res2 is not None:
                    sl2, w2 = res2
                    lumen = (w2 > 0) & sub_l[sl2]
                    view[sl2][lumen] = HU["stomach"]
                    level = st.y - st.b * scale * (1.0 - 2.0 * self.stomach_level)
                    air = lumen & (y[sl2[0]] < level)
                    view[sl2][air] = HU["air"]
                    fv = finding[r0:r1, c0:c1]
                    fv[sl2][air] = BUBBLE
            for g in self.gut:
                res = self._blob_window(view.shape, win0, g, za, 0.0)
                if res is None:
                    continue
                sl, w = res
                m = (w > 0) & abdomen[sl] & ~liver[sl]
                view[sl][m] = HU["muscle"]
                res2 = self._blob_window(view.shape, win0, Blob(g.x, g.y, g.z, g.a - 2.5, g.b - 2.5, g.c - 2.5, g.angle), za, 0.0)
                if res2 is not None:
                    sl2, w2 = res2
                    m2 = (w2 > 0) & abdomen[sl2] & ~liver[sl2]
                    view[sl2][m2] = HU["air"]
                    finding[r0:r1, c0:c1][sl2][m2] = BOWEL

        # mediastinum: heart, great vessels, trachea, oesophagus
        hx, hy, ha, hb = (float(v) for v in an.heart_geometry(p, s))
        if ha > 1.0:
            self._ellipse(view, win0, hx, hy, ha + 5.0, hb + 5.0, p.heart_angle, HU["fat"], where=cavity)
            self._ellipse(view, win0, hx, hy, ha, hb, p.heart_angle, HU["heart"], where=cavity)
        self._great_vessels(view, win0, s, cy, ac, bc, vy, vr)

        # lungs
        lr, ll = an.lung_masks(p, x, y, s)
        lung = lr | ll
        if lung.any():
            # dependent (posterior) density gradient plus a faint low-frequency heterogeneity
            par = p.parenchyma + self.parenchyma_shift + 45.0 * np.clip((y - cy) / bc, -1.0, 1.0)
            par = par + 10.0 * self.tex[r0:r1, c0:c1]
            np.copyto(view, par, where=lung)
            if self.fissures:
                fs = an.fissure_s(p, x, y, cy, ac, bc)
                band = np.abs(fs - s) * p.length < 0.45
                view[band & lung] = -640.0
        lung_full[r0:r1, c0:c1] = lung

        # bones
        self._spine(hu, za, vy, vr)
        if p.arch_s - 0.16 < s < p.dome_r_s - 0.02:
            wide = s < p.arch_s + 0.02
            sy = cy - bc - 4.0
            self._ellipse(view, win0, 0.0, sy, 24.0 if wide else 14.0, 8.0, 0.0, HU["cortical"])
            self._ellipse(view, win0, 0.0, sy, 21.0 if wide else 11.5, 5.5, 0.0, HU["marrow"])
        xs_, ys_, rs_, tag = self._cut(self.skeleton, za)
        for t, val in ((10, HU["cortical"]), (12, HU["cartilage"]), (11, HU["marrow"])):
            m = tag == t
            self._discs(hu, xs_[m], ys_[m], rs_[m], val)

        # findings that replace the parenchyma (vessels remain visible through GGO)
        for fd in self.pre:
            self._paint_finding(hu, lung_full, lesion, finding, fd, za, s)
        # consolidation hides vessels and small airways; only its own bronchograms stay dark
        solid = lung_full & (hu > -150.0)

        # vessels and airways
        xs_, ys_, rs_, _ = self._cut(self.trees.vessels, za)
        if xs_.size:
            slab = max(2.0 * self.half_slab, 1.0)
            vals = -860.0 + 900.0 * np.clip(1.6 * rs_ / slab + 0.25, 0.35, 1.0)
            self._discs(hu, xs_, ys_, rs_, vals.astype(np.float32), where=lung_full & ~solid)
        airway_where = lung_full & ~solid
        med = cavity & ~lung & ~abdomen
        airway_where[r0:r1, c0:c1] |= med
        for cloud, val in ((self.trees.airway_wall, HU["airway_wall"]), (self.trees.airway_lumen, HU["air"])):
            xs_, ys_, rs_, _ = self._cut(cloud, za)
            self._discs(hu, xs_, ys_, rs_, val, where=airway_where)

        for fd in self.post:
            self._paint_finding(hu, lung_full, lesion, finding, fd, za, s)
        for fd in self.pre:
            if fd.lumens is not None:
                xs_, ys_, rs_, _ = self._cut(fd.lumens, za)
                if xs_.size:
                    self._discs(hu, xs_, ys_, rs_, fd.lumen_hu, where=solid)
        return hu, lung_full, lesion, finding

    def _blob_window(self, shape, win0, b: Blob, za: float, soft: float):
        dz = max(abs(za - b.z) - self.half_slab, 0.0)
        if dz >= b.c:
            return None
        k = np.sqrt(1.0 - (dz / b.c) ** 2)
        r0, c0 = win0
        return ellipse_weight(shape, float(self.f.col(b.x)) - c0, float(self.f.row(b.y)) - r0,
                              b.a * k / self.f.ps, b.b * k / self.f.ps, b.angle, soft)

    def _blob_cut(self, view, win0, b: Blob, za, value, where=None):
        _paint(view, self._blob_window(view.shape, win0, b, za, 1e-3), value, where)

    def _spine(self, hu, za, vy, vr):
        """Vertebral body (or disc), neural arch, canal, spinous and transverse processes."""
        p = self.p
        disc = (za + p.vertebra_phase) % p.vertebra_pitch < 5.0
        ccy = vy + vr + 8.0
        sp = np.linspace(ccy + 12.0, ccy + 30.0, 10)
        tx = np.linspace(14.0, 34.0, 10)
        xs = [[0.0], [0.0], [0.0], [0.0], [0.0], np.zeros_like(sp), -tx, tx]
        ys = [[vy], [vy], [ccy], [ccy], [ccy], sp, ccy - 2.0 + tx * 0.25, ccy - 2.0 + tx * 0.25]
        rs: list[list[float] | np.ndarray] = [[vr], [vr - 2.2 if not disc else 0.0], [14.0], [12.0], [8.5], np.full(10, 5.0), np.full(10, 5.0), np.full(10, 5.0)]
        vs = [HU["disc"] if disc else HU["cortical"], HU["marrow"], HU["cortical"], HU["marrow"], HU["csf"],
              HU["cortical"], HU["cortical"], HU["cortical"]]
        vals = np.concatenate([np.full(len(r), v, np.float32) for r, v in zip(rs, vs, strict=True)])
        self._discs(hu, np.concatenate(xs), np.concatenate(ys), np.concatenate(rs), vals)

    def _great_vessels(self, view, win0, s, cy, ac, bc, vy, vr):
        p = self.p
        f = self.f
        r0, c0 = win0
        b = HU["blood"]
        pts_x, pts_y, pts_r, vals = [], [], [], []

        def add(x, y, r, v=b):
            pts_x.append(np.atleast_1d(np.asarray(x, np.float32)))
            pts_y.append(np.atleast_1d(np.asarray(y, np.float32)))
            pts_r.append(np.broadcast_to(np.float32(r), pts_x[-1].shape))
            vals.append(np.broadcast_to(np.float32(v), pts_x[-1].shape))

        asc = (-12.0, cy - 0.25 * bc)
        desc = (vr + 9.0, vy - 0.3 * vr)
        carina = p.arch_s + 0.06
        if s > p.arch_s - 0.03:
            add(*desc, 12.0)
        if p.arch_s - 0.035 < s < p.arch_s + 0.005:
            t = np.linspace(0, 1, 40)
            add(asc[0] + (desc[0] - asc[0]) * t, asc[1] + (desc[1] - asc[1]) * t - 6 * np.sin(np.pi * t), 13.0)
        if p.arch_s <= s < p.arch_s + 0.19:
            add(*asc, 15.0)
        if s < p.arch_s - 0.02:
            for dx, dy, r in ((-8.0, -0.15, 6.0), (6.0, -0.1, 4.5), (17.0, 0.0, 5.5), (-30.0, -0.35, 7.0), (28.0, -0.4, 7.0)):
                add(dx, cy + dy * bc, r)
        if 0.1 < s < p.arch_s + 0.16:
            add(-30.0, cy - 0.12 * bc, 10.0)
        if p.arch_s + 0.07 < s < p.arch_s + 0.15:
            add(20.0, cy - 0.3 * bc, 14.0)
        if p.arch_s + 0.08 < s < p.arch_s + 0.11:
            t = np.linspace(0, 1, 30)
            add(20.0 - t * (20.0 + 0.3 * ac), cy - 0.3 * bc + t * 0.35 * bc, 9.0)
            add(20.0 + t * 0.25 * ac, cy - 0.3 * bc + t * 0.3 * bc, 9.0)
        if s < p.dome_l_s + 0.05:
            add(7.0, vy - vr - 9.0, 7.0, 35.0)
        if pts_x:
            splat_discs(view, f.col(np.concatenate(pts_x)) - c0, f.row(np.concatenate(pts_y)) - r0,
                        np.concatenate(pts_r) / f.ps, np.concatenate(vals))
        if s < carina:
            ty = vy - vr - 22.0
            splat_discs(view, f.col([0.0]) - c0, f.row([ty]) - r0, np.array([10.0 / f.ps]), HU["airway_wall"])
            splat_discs(view, f.col([0.0]) - c0, f.row([ty]) - r0, np.array([8.2 / f.ps]), HU["air"])

    # ---- findings -----------------------------------------------------------------------------
    def _paint_finding(self, hu, lung, lesion, finding, fd: Finding, za, s):
        if fd.name == "bacterial":
            assert fd.z_range is not None and fd.lobe is not None  # a bacterial finding has both
            if not (fd.z_range[0] <= za <= fd.z_range[1]):
                return
            x = self.xs[None, :]
            y = self.ys[:, None]
            m = lobe_mask(self.p, fd.lobe, x, y, s) & lung
            if m.any():
                rows = np.flatnonzero(m.any(axis=1))
                cols = np.flatnonzero(m.any(axis=0))
                sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
                mm = m[sl]
                tex = self._texture(sl, fd.texture)
                hu[sl][mm] = (fd.hu + tex)[mm]
                finding[sl][mm] = fd.code
            return
        for blobs, value, is_core in ((fd.blobs, fd.hu, False), (fd.core, fd.core_hu, True)):
            for b in blobs:
                res = self._blob_window(hu.shape, (0, 0), b, za, 0.0 if not fd.covid else 0.35)
                if res is None:
                    continue
                sl, w = res
                w = w * lung[sl]
                if fd.covid:
                    target = value + self._texture(sl, fd.texture)
                    if fd.crazy and not is_core:
                        target = target + fd.crazy * self._reticulum(sl, b)
                    hu[sl] += (target - hu[sl]) * w
                    lesion[sl] |= w >= 0.5
                else:
                    m = w > 0.5
                    hu[sl][m] = value
                    finding[sl][m] = fd.code
        if fd.tubes is not None:
            xs_, ys_, rs_, _ = self._cut(fd.tubes, za)
            self._discs(hu, xs_, ys_, rs_, fd.tube_hu, where=lung, mark=finding, mark_value=fd.code)
        if fd.lumens is not None and not fd.covid:
            xs_, ys_, rs_, _ = self._cut(fd.lumens, za)
            self._discs(hu, xs_, ys_, rs_, fd.lumen_hu, where=lung, mark=finding, mark_value=fd.code)

    def _texture(self, sl, amp: float):
        if not amp:
            return np.float32(0.0)
        return self.tex[sl] * np.float32(amp)

    def _reticulum(self, sl, b: Blob):
        """Interlobular septal lines: a perturbed polygonal net (0..1)."""
        ps = self.f.ps
        yy = (np.arange(sl[0].start, sl[0].stop, dtype=np.float32) * ps)[:, None]
        xx = (np.arange(sl[1].start, sl[1].stop, dtype=np.float32) * ps)[None, :]
        warp = 2.5 * self._texture(sl, 1.0)
        ca, sa = np.cos(b.angle), np.sin(b.angle)
        u = (xx * ca + yy * sa) / 9.0 + warp * 0.25
        v = (-xx * sa + yy * ca) / 11.0 - warp * 0.2
        d = np.minimum(np.abs(u - np.round(u)), np.abs(v - np.round(v)))
        return np.clip(1.0 - d / 0.09, 0.0, 1.0)
