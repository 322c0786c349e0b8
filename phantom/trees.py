"""Branching pulmonary vessels and airways, stored as clouds of spheres along the centre lines.

A tree grows from a hilum towards random points that fill the lung (each branch heads for the
centroid of the points it must supply and splits them along their longest axis), which gives a
space-filling tree whose calibre halves every few generations. The tree is sampled every
fraction of a radius into spheres; a slice shows the discs where the spheres meet its slab,
so vessels look round when they cross the slice and like tubes when they run in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import Patient, sample_lung_points


@dataclass
class SphereCloud:
    """Spheres sorted by cranio-caudal position ``z`` (mm); ``tag`` is a free integer label."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    r: np.ndarray
    tag: np.ndarray

    @classmethod
    def empty(cls) -> SphereCloud:
        e = np.zeros(0, np.float32)
        return cls(e, e, e, e, np.zeros(0, np.int16))

    @classmethod
    def concat(cls, clouds: list[SphereCloud]) -> SphereCloud:
        clouds = [c for c in clouds if c.x.size]
        if not clouds:
            return cls.empty()
        x, y, z, r, tag = (np.concatenate([getattr(c, f) for c in clouds]) for f in "x y z r tag".split())
        order = np.argsort(z, kind="stable")
        return cls(x[order], y[order], z[order], r[order], tag[order])

    def cut(self, z: float, half_slab: float, rmax: float | None = None):
        """Discs where the spheres meet the slab ``z +- half_slab``: (x, y, radius, tag)."""
        if self.z.size == 0:
            e = np.zeros(0, np.float32)
            return e, e, e, np.zeros(0, np.int16)
        reach = float(self.r.max() if rmax is None else rmax) + half_slab
        lo, hi = np.searchsorted(self.z, [z - reach, z + reach])
        dz = np.maximum(np.abs(self.z[lo:hi] - z) - half_slab, 0.0)
        r = self.r[lo:hi]
        rr = r * r - dz * dz
        keep = rr > 0
        return self.x[lo:hi][keep], self.y[lo:hi][keep], np.sqrt(rr[keep]), self.tag[lo:hi][keep]


def sample_segments(p0: np.ndarray, p1: np.ndarray, r0: float | np.ndarray, r1: float | np.ndarray,
                    tag: int | np.ndarray = 0) -> SphereCloud:
    """Spheres along straight segments ``p0 -> p1`` (arrays [N, 3]) with radius tapering r0 -> r1."""
    p0 = np.asarray(p0, np.float32).reshape(-1, 3)
    p1 = np.asarray(p1, np.float32).reshape(-1, 3)
    r0 = np.broadcast_to(np.asarray(r0, np.float32), (len(p0),))
    r1 = np.broadcast_to(np.asarray(r1, np.float32), (len(p0),))
    tags = np.broadcast_to(np.asarray(tag, np.int16), (len(p0),))
    length = np.linalg.norm(p1 - p0, axis=1)
    step = np.clip(0.8 * np.minimum(r0, r1), 0.5, 2.0)
    n = np.maximum(np.ceil(length / step).astype(np.int64), 1) + 1
    seg = np.repeat(np.arange(len(p0)), n)
    start = np.cumsum(n) - n
    t = (np.arange(n.sum()) - np.repeat(start, n)) / np.repeat(n - 1, n).clip(min=1)
    t = t.astype(np.float32)
    pts = p0[seg] + (p1[seg] - p0[seg]) * t[:, None]
    r = r0[seg] + (r1[seg] - r0[seg]) * t
    return SphereCloud.concat([SphereCloud(pts[:, 0], pts[:, 1], pts[:, 2], r, tags[seg])])


def grow_tree(
    root: np.ndarray,
    targets: np.ndarray,
    r0: float,
    rng: np.random.Generator,
    *,
    max_depth: int = 9,
    decay: float = 0.79,
    min_targets: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grow a space-filling tree. Returns segment starts, ends [N, 3], radii [N] and depths [N].

    Level by level and vectorised over the nodes of a level: every node heads for the centroid of
    its target points, stops (a leaf) when it has fewer than ``min_targets`` or at ``max_depth``,
    and otherwise splits its points across their principal axis into two children.
    """
    pts = np.asarray(targets, np.float64)
    label = np.zeros(len(pts), np.int64)
    starts = np.asarray(root, np.float64)[None, :]
    out_a, out_b, out_r, out_d = [], [], [], []
    r = float(r0)
    for depth in range(max_depth + 1):
        n_nodes = len(starts)
        counts = np.bincount(label, minlength=n_nodes).astype(np.float64)
        centre = np.stack([np.bincount(label, pts[:, i], n_nodes) for i in range(3)], axis=1) / counts[:, None]
        leaf = (counts < min_targets) | (depth == max_depth)
        frac = 0.45 if depth else 0.3
        jitter = rng.normal(0.0, 0.6, (n_nodes, 3))
        ends = np.where(leaf[:, None], centre, starts + (centre - starts) * frac + jitter)
        out_a.append(starts)
        out_b.append(ends)
        out_r.append(np.full(n_nodes, r))
        out_d.append(np.full(n_nodes, depth))
        if leaf.all():
            break
        d = pts - centre[label]
        cov = np.empty((n_nodes, 3, 3))
        for i in range(3):
            for j in range(i, 3):
                cov[:, i, j] = cov[:, j, i] = np.bincount(label, d[:, i] * d[:, j], n_nodes)
        axis = np.linalg.eigh(cov)[1][:, :, -1]
        side = np.einsum("ij,ij->i", d, axis[label]) > 0
        keep = ~leaf[label]
        child = 2 * label[keep] + side[keep]
        pts = pts[keep]
        uniq, label = np.unique(child, return_inverse=True)
        starts = ends[uniq // 2]
        r *= decay
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_r), np.concatenate(out_d)


@dataclass
class LungTrees:
    vessels: SphereCloud
    airway_wall: SphereCloud
    airway_lumen: SphereCloud


def build_trees(p: Patient, rng: np.random.Generator, *, detail: float = 1.0) -> LungTrees:
    """Arteries, veins and airways for both lungs."""
    s_hilum = p.arch_s + 0.14
    cy, ac, bc = p.cavity(s_hilum)
    cy, ac, bc = float(cy), float(ac), float(bc)
    n_targets = int(2400 * detail)
    vessels, walls, lumens = [], [], []
    carina = np.array([0.0, cy + 0.45 * bc, (p.arch_s + 0.06) * p.length])
    for sign, side in ((-1.0, "right"), (1.0, "left")):
        hilum = np.array([sign * 0.3 * ac, cy + 0.05 * bc, s_hilum * p.length])
        for system, root, r0 in (
            ("artery", hilum + np.array([0.0, -6.0, -8.0]), 7.5),
            ("vein", hilum + np.array([sign * -6.0, 12.0, 18.0]), 6.5),
        ):
            targets = sample_lung_points(p, rng, n_targets, side)
            a, b, r, d = grow_tree(root, targets, r0, rng, max_depth=10)
            r_end = r * 0.79
            vessels.append(sample_segments(a, b, r, r_end, tag=1))
            if system == "artery":
                # bronchi run beside the arteries: same branching, offset sideways, fewer generations
                keep = d <= 6
                a, b, r = a[keep], b[keep], r[keep]
                direction = b - a
                lateral = np.cross(direction, np.array([0.0, 0.0, 1.0]))
                norm = np.linalg.norm(lateral, axis=1, keepdims=True)
                lateral = np.where(norm > 1e-6, lateral / np.maximum(norm, 1e-6), np.array([1.0, 0.0, 0.0]))
                shift = lateral * (1.7 * r)[:, None]
                lumen = 0.75 * r
                wall = lumen + np.maximum(0.35 * lumen, 0.5)
                walls.append(sample_segments(a + shift, b + shift, wall, wall * 0.85, tag=2))
                lumens.append(sample_segments(a + shift, b + shift, lumen, lumen * 0.85, tag=3))
                # main bronchus: carina -> first airway branch point
                main = np.array([a[0] + shift[0]])
                walls.append(sample_segments(carina[None], main, 8.5, wall[0], tag=2))
                lumens.append(sample_segments(carina[None], main, 6.5, lumen[0], tag=3))
    return LungTrees(SphereCloud.concat(vessels), SphereCloud.concat(walls), SphereCloud.concat(lumens))
