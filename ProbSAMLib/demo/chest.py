"""Chest-field phantom (generator v3): a real LIDC nodule outline rendered inside a whole synthetic chest slice.

LiteMedSAM (and SAM-style encoders in general) read a whole CT slice; a 90-118 mm patch of smooth lung
(ProbSAMLib.demo.phantom) looks nothing like what they were trained on. This renderer draws the scan's
whole in-plane field of view (by default 512 x 512 pixels at the scan's own spacing, like a LIDC-IDRI
slice) around the readers' masks, on the slices the masks' grid spans:

- air outside the body (-1000 HU), a patient table;
- the body outline (a flattened super-ellipse with a gently wavy contour), skin, subcutaneous fat
  (-100 HU), chest-wall and paraspinal muscle (+45 HU);
- ribs (cortical rim ~900 HU around marrow ~250 HU) whose cross-sections drift and come and go along z,
  the sternum, at upper levels the scapulae;
- the spine (vertebral body, canal, posterior elements);
- two lungs (~-850 HU, correlated texture, a dependent-lung gradient) shaped by the thoracic cavity minus
  the mediastinum, whose content depends on the slice's level: heart (+40 HU) in mediastinal fat
  (-100 HU) low, aorta / pulmonary trunk / SVC in the middle, trachea or main bronchi and the aortic
  arch high, the liver dome at the base;
- pulmonary vessels: a 3D tree branching from each hilum, tapering toward the periphery;
- the nodule: :func:`ProbSAMLib.demo.nodule._nodule_density` (density from the readers' agreement,
  texture and margin ratings), placed in a lung at (or, when the anatomy does not fit, near) its real
  in-plane position: clear of the pleura, or, for juxta-pleural placement, just touching the chest wall
  or the mediastinum;
- an optional hard case (Training.data.phantom_cases.NoduleCase, duck-typed: ``name``, ``variant``,
  ``rendering_ratings``, ``apply``), whose local structures are kept inside the lungs near the nodule;
- in-plane correlated CT noise.

The chest anatomy varies smoothly along z (a slice "level" from lung base to apex drives its content).
The readers' masks are never changed: the anatomy is moved to fit them. Everything is vectorised numpy /
scipy and deterministic for a given seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage, signal
from scipy.special import expit

from ProbSAMLib.demo.nodule import (LUNG_HU, PhantomVolume, _nodule_box, _nodule_density, _smooth_noise,
                                    to_phantom_volume)

SCAN_SIZE = 512  # in-plane pixels of a LIDC-IDRI slice
FAT_HU, MUSCLE_HU, SKIN_HU = -100.0, 45.0, 20.0
PLACEMENTS = ("lung", "wall", "mediastinum")


def _smoothstep(edge0, edge1, x):
    t = np.clip((np.asarray(x, dtype=np.float64) - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _smin(a, b, k):
    """Smooth minimum (polynomial, blend width k mm) of two signed distances: a rounded union."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smax(a, b, k):
    return -_smin(-a, -b, k)


def _ellipse_sd(u, v, cu, cv, a, b, angle=0.0, p=2.0):
    """Approximate signed distance (mm, < 0 inside) to a rotated super-ellipse, radial along rays."""
    du, dv = u - cu, v - cv
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        du, dv = c * du + s * dv, -s * du + c * dv
    rho = (np.abs(du / a) ** p + np.abs(dv / b) ** p) ** (1.0 / p)
    r = np.sqrt(du * du + dv * dv)
    return r * (1.0 - 1.0 / np.maximum(rho, 1e-6)) if p else rho


def _circle_sd(u, v, cu, cv, r):
    return np.sqrt((u - cu) ** 2 + (v - cv) ** 2) - r


def _capsule_sd(u, v, p0, p1, r):
    """Signed distance to a 2D capsule (segment p0-p1 of radius r)."""
    pu, pv = u - p0[0], v - p0[1]
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip((pu * du + pv * dv) / max(du * du + dv * dv, 1e-6), 0.0, 1.0)
    return np.sqrt((pu - t * du) ** 2 + (pv - t * dv) ** 2) - r


def _fourier(rng, n_terms, amplitude):
    """A random smooth periodic function of the angle: (coefficients, phases)."""
    amp = amplitude * rng.uniform(0.3, 1.0, n_terms) / np.arange(1, n_terms + 1)
    return amp, rng.uniform(0, 2 * np.pi, n_terms)


def _eval_fourier(coef, theta):
    amp, phase = coef
    out = np.zeros_like(theta)
    for k, (a, ph) in enumerate(zip(amp, phase), start=2):  # from the 2nd harmonic: no shift
        out += a * np.cos(k * theta + ph)
    return out


@dataclass
class ChestAnatomy:
    """The random parameters of one synthetic chest (mm; u to the image right = patient's left,
    v down = posterior). ``centre`` is the body centre in the scan plane (x, y mm)."""

    centre: np.ndarray
    half_width: float
    half_depth: float
    exponent: float
    wobble: tuple
    fat: float
    fat_wobble: tuple
    muscle: float
    level0: float  # level of slice z = 0 (0 = lung base, 1 = apex)
    lung_height: float
    med_half_width: float
    heart: tuple  # (u, v, a, b, angle)
    aorta_r: float
    contrast: bool
    vertebra_r: float
    ribs: np.ndarray  # (n, 5): side, angle from lateral (+ posterior), drift per mm, z phase, arc mm
    rib_pitch: float
    table_gap: float
    parenchyma_hu: float
    gradient_hu: float

    @classmethod
    def draw(cls, rng, fov_mm: float, level0: float) -> "ChestAnatomy":
        half_width = fov_mm * rng.uniform(0.41, 0.47)
        half_depth = half_width * rng.uniform(0.62, 0.76)
        n_ribs = 28  # rib fragments, 14 a side, from beside the spine round to the front
        side = np.repeat([-1.0, 1.0], n_ribs // 2)
        angle = np.tile(np.linspace(-1.2, 1.45, n_ribs // 2), 2) + rng.normal(0, 0.06, n_ribs)
        ribs = np.stack([side, angle, rng.uniform(0.004, 0.010, n_ribs) * rng.choice([-1, 1], n_ribs),
                         rng.uniform(0.0, 1.0, n_ribs),  # phase along z (fraction of the rib pitch)
                         np.where(np.abs(angle) < 0.8, rng.uniform(14.0, 34.0, n_ribs),
                                  rng.uniform(8.0, 16.0, n_ribs))], axis=1)
        return cls(
            centre=np.array([fov_mm / 2 + rng.normal(0, 0.015 * fov_mm),
                             fov_mm / 2 + rng.uniform(-0.01, 0.05) * fov_mm]),
            half_width=half_width, half_depth=half_depth, exponent=rng.uniform(1.9, 2.3),
            wobble=_fourier(rng, 5, 0.03), fat=rng.uniform(5.0, 22.0), fat_wobble=_fourier(rng, 4, 0.35),
            muscle=rng.uniform(5.0, 11.0), level0=level0, lung_height=rng.uniform(210.0, 270.0),
            med_half_width=rng.uniform(8.0, 16.0),
            heart=(rng.uniform(0.08, 0.2), rng.uniform(-0.2, -0.05), rng.uniform(0.3, 0.38),
                   rng.uniform(0.28, 0.36), rng.uniform(-0.7, -0.3)),
            aorta_r=rng.uniform(10.0, 14.0), contrast=bool(rng.random() < 0.3),
            vertebra_r=rng.uniform(15.0, 20.0), ribs=ribs, rib_pitch=rng.uniform(22.0, 30.0), table_gap=rng.uniform(5.0, 35.0),
            parenchyma_hu=LUNG_HU + rng.uniform(-40.0, 30.0), gradient_hu=rng.uniform(30.0, 90.0))

    # ---- 2D geometry of one slice --------------------------------------------------------------

    def level(self, z_mm: float) -> float:
        return float(np.clip(self.level0 + z_mm / self.lung_height, 0.0, 1.0))

    def body_radius(self, theta):
        a, b, p = self.half_width, self.half_depth, self.exponent
        c, s = np.abs(np.cos(theta)), np.abs(np.sin(theta))
        # posterior (v > 0) flattened by the table: a higher exponent there
        pp = np.where(np.sin(theta) > 0, p + 0.6, p)
        r = 1.0 / ((c / a) ** pp + (s / b) ** pp) ** (1.0 / pp)
        return r * (1.0 + _eval_fourier(self.wobble, theta))

    def plane(self, u, v) -> dict:
        """The slice-independent fields of the plane (u, v): angle, radius, body outline, wall layers."""
        theta = np.arctan2(v, u)
        r = np.sqrt(u * u + v * v)
        rb = self.body_radius(theta)
        fat = self.fat * (1.0 + _eval_fourier(self.fat_wobble, theta))
        fat = fat * (1.0 + 0.4 * np.clip(np.sin(theta), 0, 1))  # more fat posterolaterally
        muscle = self.muscle * (1.0 + 2.5 * np.clip(np.sin(theta), 0, 1) ** 4)  # paraspinal
        f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731  (keep the planes float32)
        return dict(theta=f32(theta), r=f32(r), rb=f32(rb), fat=f32(fat), muscle=f32(muscle))

    def geometry(self, u, v, t, plane: Optional[dict] = None):
        """Signed distances (mm, < 0 inside) of the slice at level t: dict of 2D arrays."""
        plane = plane if plane is not None else self.plane(u, v)
        theta, r, rb, fat, muscle = (plane[k] for k in ("theta", "r", "rb", "fat", "muscle"))
        body = r - rb
        apex = float(_smoothstep(0.6, 1.0, t))  # the cavity narrows toward the apex (shoulder muscles)
        wall = fat + muscle + 6.0
        cavity_r = (rb - wall) * (1.0 - 0.35 * apex)
        cavity = r - cavity_r
        # Spine: the vertebral body bulges into the cavity at the posterior midline.
        post = float(self.body_radius(np.array(np.pi / 2)) - 1.4 * self.fat - 3.5 * self.muscle - 6.0)
        post = float(post * (1.0 - 0.35 * apex))
        vb_v = post - 0.45 * self.vertebra_r
        vertebra = _circle_sd(u, v, 0.0, vb_v, self.vertebra_r)
        # Mediastinum: a central strip from the sternum to the spine, plus level-dependent organs.
        mw = self.med_half_width * (1.0 - 0.3 * apex)
        strip = np.maximum(np.abs(u) - mw, np.maximum(-cavity_r * 0.9 - v, v - vb_v))
        med = _smin(strip, vertebra - 4.0, 10.0)
        organs = {}
        hu_heart, hu_vessel = 40.0, (170.0 if self.contrast else 40.0)
        heart_size = 1.0 - float(_smoothstep(0.25, 0.48, t))
        if heart_size > 0.02:
            hu_, hv_, ha, hb, hang = self.heart
            heart = _ellipse_sd(u, v, hu_ * self.half_width, hv_ * self.half_depth,
                                ha * self.half_width * heart_size ** 0.5,
                                hb * self.half_depth * heart_size ** 0.5, hang)
            organs["heart"] = (heart, hu_heart)
            med = _smin(med, heart - 5.0, 8.0)
        aorta_v = vb_v - self.vertebra_r * 0.6
        if t < 0.72:
            organs["aorta_d"] = (_circle_sd(u, v, 0.9 * self.vertebra_r + 8.0, aorta_v, self.aorta_r), hu_vessel)
            med = _smin(med, organs["aorta_d"][0] - 3.0, 6.0)
        if 0.42 < t < 0.72:
            asc = _circle_sd(u, v, 8.0, -0.35 * self.half_depth, self.aorta_r * 1.2)
            pulm = _circle_sd(u, v, 32.0, -0.25 * self.half_depth, self.aorta_r * 1.1) if t < 0.6 else None
            svc = _circle_sd(u, v, -25.0, -0.3 * self.half_depth, 9.0)
            for name, sd in (("aorta_a", asc), ("pulmonary", pulm), ("svc", svc)):
                if sd is not None:
                    organs[name] = (sd, hu_vessel)
                    med = _smin(med, sd - 4.0, 8.0)
        if 0.68 < t < 0.76:  # the aortic arch
            arch = _capsule_sd(u, v, (8.0, -0.35 * self.half_depth), (0.9 * self.vertebra_r + 8.0, aorta_v),
                               self.aorta_r)
            organs["arch"] = (arch, hu_vessel)
            med = _smin(med, arch - 3.0, 8.0)
        airway = None
        if t >= 0.6:
            airway = _circle_sd(u, v, 0.0, vb_v - self.vertebra_r - 16.0, 9.0)
        elif t > 0.45:  # main bronchi
            spread = 12.0 + 60.0 * (0.6 - t)
            airway = np.minimum(_circle_sd(u, v, -spread, vb_v - self.vertebra_r - 18.0, 6.5),
                                _circle_sd(u, v, spread, vb_v - self.vertebra_r - 18.0, 6.0))
        if airway is not None:
            med = _smin(med, airway - 3.0, 6.0)
        organs["esophagus"] = (_circle_sd(u, v, 6.0, vb_v - self.vertebra_r - 5.0, 7.0), 35.0)
        lung = _smax(cavity, -med, 6.0)
        # The diaphragm dome at the base: liver on the patient's right (image left), spleen on the left.
        dome = None
        if t < 0.15:
            grow = (0.15 - t) / 0.15
            liver = _circle_sd(u, v, -0.35 * self.half_width, 0.1 * self.half_depth, 0.85 * self.half_width * grow)
            spleen = _circle_sd(u, v, 0.4 * self.half_width, 0.2 * self.half_depth, 0.6 * self.half_width * grow)
            dome = np.minimum(liver, spleen)
            lung = _smax(lung, -dome, 6.0)
        return dict(theta=theta, body=body, fat_depth=fat, muscle_depth=fat + muscle, cavity=cavity,
                    cavity_r=cavity_r, lung=lung, med=med, vertebra=vertebra, vb_v=vb_v, organs=organs,
                    airway=airway, dome=dome, apex=apex)


def _soft(sd, width):
    """Inside weight in [0, 1] of a signed distance (< 0 inside), edge `width` mm."""
    return expit(-sd / width).astype(np.float32)


def _bone(sd, marrow_hu, cortex_hu, cortex_mm, soft):
    """(weight, HU) of a bone: a dense rim around marrow."""
    weight = _soft(sd, soft)
    hu = marrow_hu + (cortex_hu - marrow_hu) * np.exp(np.minimum(sd, 0.0) / cortex_mm)
    return weight, hu


def _paint(image, weight, hu):
    image += weight * (hu - image)


def render_slice(anat: ChestAnatomy, u, v, z_mm: float, soft: float, plane: Optional[dict] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """One axial slice of the chest (no vessels, no nodule, no noise): (HU, lung weight) float32.

    plane: ChestAnatomy.plane(u, v), computed once for all slices of a volume."""
    t = anat.level(z_mm)
    g = anat.geometry(u, v, t, plane)
    image = np.full(np.broadcast(u, v).shape, -1000.0, dtype=np.float32)
    # table: a curved band below the back
    back = anat.half_depth * 0.98 + anat.table_gap
    table = np.abs(v - back - 0.0008 * u * u - 4.0) - 3.0
    _paint(image, _soft(np.maximum(table, np.abs(u) - 0.9 * anat.half_width * 1.6), soft), 60.0)
    body = g["body"]
    _paint(image, _soft(body, soft), SKIN_HU)
    _paint(image, _soft(body + 1.6, soft), FAT_HU)
    _paint(image, _soft(body + g["fat_depth"], 1.0), MUSCLE_HU)
    # ribs: arcs in a band 3..10 mm outside the cavity, computed on the band's pixels only
    shape = image.shape
    depth = np.broadcast_to(-g["cavity"], shape)  # > 0 inside the cavity
    band = np.flatnonzero(np.abs(depth + 6.5) < 3.5 + 4.0 * soft + 1.0)
    if band.size:
        theta_b = np.broadcast_to(g["theta"], shape).reshape(-1)[band]
        rad_b = np.broadcast_to(g["cavity_r"], shape).reshape(-1)[band]
        across = np.abs(depth.reshape(-1)[band] + 6.5) - 3.5
        ribs = np.zeros(band.size, np.float32)
        ribs_hu = np.zeros(band.size, np.float32)
        for side, angle0, drift, phase, arc in anat.ribs:
            # a rib crosses the slice over about half of each rib pitch along z
            present = _smoothstep(-0.15, 0.15, np.cos(2 * np.pi * (z_mm / anat.rib_pitch - phase)))
            if present <= 0:
                continue
            centre_angle = (0.0 if side > 0 else np.pi) + side * (angle0 + drift * z_mm)
            dtheta = np.abs((theta_b - centre_angle + np.pi) % (2 * np.pi) - np.pi)
            along = dtheta * rad_b - 0.5 * arc
            sd = np.sqrt(np.maximum(along, 0) ** 2 + np.maximum(across, 0) ** 2) \
                + np.minimum(np.maximum(along, across), 0) - 0.5
            weight, hu = _bone(sd, 250.0, 850.0, 1.2, soft)
            weight = weight * float(present)
            better = weight > ribs
            ribs = np.where(better, weight, ribs)
            ribs_hu = np.where(better, hu, ribs_hu)
        flat = image.reshape(-1)
        flat[band] += ribs * (ribs_hu - flat[band])
    # sternum (not at the very base or apex)
    if 0.2 < t < 0.9:
        front = -float(anat.body_radius(np.array(-np.pi / 2))) + anat.fat + 4.0
        weight, hu = _bone(_ellipse_sd(u, v, 0.0, front + 8.0, 16.0, 7.0), 250.0, 700.0, 1.5, soft)
        _paint(image, weight, hu)
    # scapulae: plates behind the posterolateral ribs at upper levels
    if t > 0.55:
        for side in (-1.0, 1.0):
            cu, cv = side * 0.6 * anat.half_width, 0.62 * anat.half_depth
            sd = _ellipse_sd(u, v, cu, cv, 45.0 * (t - 0.45) / 0.55 + 10.0, 4.0, -side * 0.55)
            weight, hu = _bone(sd, 300.0, 800.0, 1.2, soft)
            _paint(image, weight, hu)
    # the thoracic cavity: mediastinal fat, organs, spine
    _paint(image, _soft(g["cavity"], 1.0), FAT_HU + 10.0)
    if g["dome"] is not None:
        _paint(image, _soft(g["dome"], 2.0), 55.0)
    for name, (sd, hu) in g["organs"].items():
        _paint(image, _soft(sd, soft), hu)
    vb = g["vertebra"]
    weight, hu = _bone(vb, 230.0, 700.0, 1.5, soft)
    _paint(image, weight, hu)
    vb_v = g["vb_v"]
    canal = _circle_sd(u, v, 0.0, vb_v + anat.vertebra_r + 8.0, 7.5)
    arch = _ellipse_sd(u, v, 0.0, vb_v + anat.vertebra_r + 10.0, 17.0, 13.0)
    spinous = _capsule_sd(u, v, (0.0, vb_v + anat.vertebra_r + 18.0), (0.0, vb_v + anat.vertebra_r + 38.0), 4.0)
    transverse = _capsule_sd(u, v, (-28.0, vb_v + anat.vertebra_r + 6.0), (28.0, vb_v + anat.vertebra_r + 6.0), 4.5)
    posterior = np.minimum(np.minimum(np.maximum(arch, -canal - 3.0), spinous), transverse)
    weight, hu = _bone(posterior, 300.0, 750.0, 1.5, soft)
    _paint(image, weight, hu)
    _paint(image, _soft(canal, soft), 15.0)
    # lungs
    lung_w = _soft(g["lung"], 0.6)
    gradient = anat.gradient_hu * np.clip(v / anat.half_depth, -1.0, 1.0) * 0.5
    _paint(image, lung_w, anat.parenchyma_hu + gradient)
    if g["airway"] is not None:
        _paint(image, _soft(g["airway"] - 1.5, soft), 20.0)  # the airway wall
        _paint(image, _soft(g["airway"], soft), -990.0)
    return image, lung_w


# ---- pulmonary vessel tree --------------------------------------------------------------------

def vessel_tree(rng, anat: ChestAnatomy, lung_inside, z_range: Tuple[float, float],
                max_segments: int = 40000) -> np.ndarray:
    """(n, 8) segments (z0, y0, x0, z1, y1, x1, r0, r1) in scan mm of a tree from each hilum, grown one
    generation at a time (vectorised): each segment splits in two thinner, diverging children (Murray-like
    radius ratio 0.72-0.88) until the radius falls below 0.3 mm or the branch leaves the lung.

    lung_inside(points (n, 3) zyx mm) -> bool: where a branch may grow.
    """
    z_hilum = (0.55 - anat.level0) * anat.lung_height
    starts, dirs, radii = [], [], []
    for side in (-1.0, 1.0):
        hilum = np.array([z_hilum, anat.centre[1] - 0.05 * anat.half_depth,
                          anat.centre[0] + side * (anat.med_half_width + 22.0)])
        for d in ([1.0, 0.1, 0.3 * side], [-1.0, 0.1, 0.3 * side], [0.0, -0.5, side], [0.0, 0.6, side],
                  [0.4, -0.3, side], [-0.5, 0.4, side], [0.6, 0.5, 0.5 * side], [-0.7, -0.3, 0.6 * side]):
            d = np.array(d) + rng.normal(0, 0.15, 3)
            starts.append(hilum)
            dirs.append(d / np.linalg.norm(d))
            radii.append(rng.uniform(4.0, 6.0))
    start, direction, radius = np.array(starts), np.array(dirs), np.array(radii)
    segs, total = [], 0
    while len(start) and total < max_segments:
        n = len(start)
        length = np.clip(radius * rng.uniform(4.0, 9.0, n), 2.5, 30.0)[:, None]
        end = start + direction * length
        inside = lung_inside(end) | (radius >= 3.0)  # hilar trunks may cross the mediastinum
        bent = direction + rng.normal(0, 0.8, (n, 3))
        bent /= np.linalg.norm(bent, axis=1, keepdims=True)
        retry = ~inside & lung_inside(start + bent * length)  # try to bend back into the lung once
        direction = np.where(retry[:, None], bent, direction)
        end = np.where(retry[:, None], start + bent * length, end)
        keep = inside | retry
        start, end, direction, radius = start[keep], end[keep], direction[keep], radius[keep]
        r_end = radius * rng.uniform(0.92, 0.98, len(radius))
        segs.append(np.concatenate([start, end, radius[:, None], r_end[:, None]], axis=1))
        total += len(start)
        grow = (r_end >= 0.3) & (end[:, 0] > z_range[0] - 150) & (end[:, 0] < z_range[1] + 150)
        end, direction, r_end = end[grow], direction[grow], r_end[grow]
        m = len(end)
        perp = rng.standard_normal((m, 3))
        perp -= (perp * direction).sum(axis=1, keepdims=True) * direction
        perp /= np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-6)
        spread = rng.uniform(0.3, 0.8, (m, 1))
        first = direction + spread * perp
        second = direction - spread * rng.uniform(0.6, 1.2, (m, 1)) * perp
        children = np.concatenate([first, second])
        children /= np.linalg.norm(children, axis=1, keepdims=True)
        start = np.concatenate([end, end])
        direction = children
        radius = np.concatenate([r_end, r_end]) * rng.uniform(0.72, 0.88, 2 * m)
    out = np.concatenate(segs) if segs else np.zeros((0, 8))
    return out[:max_segments]


def render_segments(segments, shape, spacing_zyx, origin_zyx, soft) -> np.ndarray:
    """Soft union in [0, 1] of tapered tubes on the (K, J, I) grid (voxel (0,0,0) at origin_zyx mm).

    Vectorised: the centrelines are rasterised (with their radius) on the grid grown by a z margin, one
    Euclidean distance transform finds each voxel's nearest centreline voxel, and a voxel's weight is
    expit((radius there - distance) / soft).
    """
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    org = np.asarray(origin_zyx, dtype=np.float64)
    margin = int(np.ceil(7.0 / sp[0]))
    padded = (shape[0] + 2 * margin,) + tuple(shape[1:])
    org = org - np.array([margin * sp[0], 0.0, 0.0])
    if not len(segments):
        return np.zeros(shape, dtype=np.float32)
    p0, p1 = segments[:, 0:3], segments[:, 3:6]
    step = 0.5 * float(sp.min())
    counts = np.ceil(np.linalg.norm(p1 - p0, axis=1) / step).astype(int) + 1
    seg = np.repeat(np.arange(len(segments)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    t = (np.arange(counts.sum()) - first) / np.maximum(np.repeat(counts, counts) - 1, 1)
    points = p0[seg] + t[:, None] * (p1 - p0)[seg]
    radius = segments[seg, 6] + t * (segments[seg, 7] - segments[seg, 6])
    index = np.rint((points - org) / sp).astype(np.int64)
    ok = np.all((index >= 0) & (index < np.array(padded)), axis=1)
    index, radius = index[ok], radius[ok]
    radius_at = np.zeros(padded, dtype=np.float32)
    order = np.argsort(radius)  # the widest tube wins a shared voxel
    radius_at[tuple(index[order].T)] = radius[order]
    seeds = radius_at > 0
    if not seeds.any():
        return np.zeros(shape, dtype=np.float32)
    nearest = np.empty((3,) + padded, dtype=np.int32)
    dist = ndimage.distance_transform_edt(~seeds, sampling=sp, return_distances=True,
                                          return_indices=True, indices=nearest)
    r = radius_at[tuple(nearest)]
    out = expit((r - dist) / soft).astype(np.float32)
    return out[margin:margin + shape[0]]


# ---- nodule placement ---------------------------------------------------------------------------

def _overlap(region: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Pixels of `region` under `footprint` for each top-left position (Y, X) of the footprint, Y in
    0..H-h, X in 0..W-w (FFT correlation)."""
    h, w = footprint.shape
    full = signal.fftconvolve(region.astype(np.float32), footprint[::-1, ::-1].astype(np.float32), mode="full")
    return full[h - 1:region.shape[0], w - 1:region.shape[1]]


def place(anat: ChestAnatomy, union: np.ndarray, spacing_xy: float, grid_offset, z_mm: float,
          placement: str, rng, scan_size: int) -> dict:
    """Move the anatomy (anat.centre) so the nodule's footprint lies in a lung as `placement` asks.

    union: (K, H, W) readers' union on the output grid placed at grid_offset (row0, col0) of the
    scan plane. Returns info about the placement (shift in mm, whether it found a fit).
    """
    rows, cols = np.nonzero(union.any(axis=0))
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    foot = union.any(axis=0)[r0:r1, c0:c1]
    top_left = np.array([r0 + grid_offset[0], c0 + grid_offset[1]])
    # Evaluate the anatomy on a coarse grid (2 px) of the whole scan plane.
    step = 2
    n = scan_size // step
    coords = (np.arange(n) * step + 0.5 * (step - 1)) * spacing_xy
    fp = ndimage.zoom(foot.astype(np.float32), 1.0 / step, order=1) > 0.25 if min(foot.shape) > 2 * step \
        else np.ones((max(1, foot.shape[0] // step), max(1, foot.shape[1] // step)), bool)
    u = coords[None, :] - anat.centre[0]
    v = coords[:, None] - anat.centre[1]
    g = anat.geometry(u, v, anat.level(z_mm))
    lung = g["lung"] < 0
    clear_px = int(np.ceil(3.0 / (spacing_xy * step)))
    dilated = ndimage.binary_dilation(np.pad(fp, clear_px), iterations=clear_px)
    padded = np.pad(fp, clear_px)  # same frame as `dilated`: top-left clear_px before the footprint
    area = fp.sum()
    if placement == "lung":
        good = _overlap(~lung, dilated) < 0.5
    else:
        near = (g["cavity"] > 0) if placement == "wall" else (g["cavity"] <= 0) & ~lung
        touch = _overlap(near, padded)
        good = (touch >= 0.5) & (touch <= max(1.5, 0.08 * area)) & (_overlap(~lung & ~near, dilated) < 0.5)
    valid = np.argwhere(good)
    info = {"placement": placement, "fitted": bool(len(valid))}
    if not len(valid):
        return dict(info, shift_mm=[0.0, 0.0])
    # valid[:, :] are top-left positions (coarse px) of the (dilated) footprint
    target = top_left / step - clear_px
    dist = np.linalg.norm(valid - target, axis=1)
    best = np.flatnonzero(dist <= dist.min() + 1.0)
    pick = valid[best[rng.integers(len(best))]]
    shift_px = (target - pick) * step  # (rows, cols)
    shift_mm = shift_px * spacing_xy
    anat.centre = anat.centre + np.array([shift_mm[1], shift_mm[0]])
    return dict(info, shift_mm=[float(shift_mm[1]), float(shift_mm[0])])


def placement_of(case) -> str:
    """The placement a hard case asks for: juxta_pleural -> chest wall (base) / mediastinum (held out)."""
    if case is not None and getattr(case, "name", "") == "juxta_pleural":
        return "mediastinum" if getattr(case, "variant", "base") == "heldout" else "wall"
    return "lung"


def render_chest_volume(reader_masks: np.ndarray, spacing: Sequence[float],
                        ratings: Sequence[Mapping[str, float]], seed: int,
                        grid_offset: Tuple[int, int] = (0, 0), scan_size: int = SCAN_SIZE,
                        origin: Sequence[float] = (0.0, 0.0, 0.0), case=None,
                        placement: Optional[str] = None, level: Optional[float] = None,
                        noise_hu: Optional[float] = None) -> PhantomVolume:
    """Render a nodule's slices inside a whole synthetic chest slice.

    reader_masks: (R, K, H, W) bool on the output grid: K slices, an H x W window of the scan plane whose
                  pixel (0, 0) is pixel `grid_offset` (row, col) of a `scan_size`^2 slice; pass H = W =
                  scan_size and (0, 0) to render the whole slice (the chest field is scan_size x spacing
                  mm wide: 512 px at 0.7 mm = 358 mm).
    spacing:      (x, y, z) mm. ratings: R dicts (texture, margin, calcification as in phantom.py).
    seed:         the only source of randomness.
    case:         optional hard case (Training.data.phantom_cases.NoduleCase): juxta_pleural becomes a
                  placement against the chest wall (base) or the mediastinum (held out); the other
                  cases' structures are drawn as in generator v2, kept inside the lungs.
    placement:    'lung' (clear of the pleura), 'wall' or 'mediastinum' (touching); default from case.
    level:        the nodule's level (0 = lung base, 1 = apex); default random in 0.15..0.85.
    Returns a PhantomVolume (int16 HU image, the masks unchanged on the image grid); info holds the
    anatomy's level and the placement.
    """
    reader_masks = np.asarray(reader_masks, dtype=bool)
    if reader_masks.ndim != 4 or reader_masks.shape[0] < 1:
        raise ValueError(f"reader_masks must be (R, K, H, W) with R >= 1, got {reader_masks.shape}")
    if len(ratings) != reader_masks.shape[0]:
        raise ValueError(f"{len(ratings)} ratings for {reader_masks.shape[0]} readers")
    K, H, W = reader_masks.shape[1:]
    if grid_offset[0] < 0 or grid_offset[1] < 0 or grid_offset[0] + H > scan_size or grid_offset[1] + W > scan_size:
        raise ValueError(f"a {H}x{W} window at {tuple(grid_offset)} does not fit a {scan_size}^2 slice")
    placement = placement or placement_of(case)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    spacing_zyx = tuple(float(s) for s in spacing[::-1])
    sxy = float(spacing[0])
    fov = scan_size * sxy
    rng_anat = np.random.default_rng([seed, 31])
    rng_tex = np.random.default_rng([seed, 32])
    rng_nod = np.random.default_rng([seed, 33])

    union = reader_masks.any(axis=0)
    marked = np.flatnonzero(union.reshape(K, -1).any(axis=1))
    k_mid = 0.5 * (marked[0] + marked[-1]) if marked.size else 0.5 * (K - 1)
    z = (np.arange(K) - k_mid) * spacing_zyx[0]  # mm from the nodule's middle slice
    level0 = float(level) if level is not None else float(rng_anat.uniform(0.15, 0.85))
    anat = ChestAnatomy.draw(rng_anat, fov, level0)
    info = {"generator": "chest", "level": level0, "fov_mm": fov, "contrast": anat.contrast}
    if marked.size:
        info.update(place(anat, union, sxy, grid_offset, 0.0, placement, rng_anat, scan_size))
    else:
        info.update(placement=placement, fitted=False, shift_mm=[0.0, 0.0])

    # In-plane coordinates of the window (mm, scan plane), relative to the body centre.
    x = (np.arange(W) + grid_offset[1]) * sxy
    y = (np.arange(H) + grid_offset[0]) * sxy
    u = (x - anat.centre[0])[None, :].astype(np.float32)
    v = (y - anat.centre[1])[:, None].astype(np.float32)
    soft = 0.5 * sxy
    image = np.empty((K, H, W), dtype=np.float32)
    lung_w = np.empty((K, H, W), dtype=np.float32)
    plane = anat.plane(u, v)
    for k in range(K):
        image[k], lung_w[k] = render_slice(anat, u, v, float(z[k]), soft, plane)

    # Parenchymal texture (2 mm, as phantom.py) and a coarser patchiness, inside the lungs only.
    tex = 28.0 * _smooth_noise(rng_tex, (K, H, W), [2.0 / s for s in spacing_zyx])
    tex += 15.0 * ndimage.zoom(_smooth_noise(rng_tex, (K, max(H // 8, 2), max(W // 8, 2)),
                                             [1.0, 1.0, 1.0]), (1, H / max(H // 8, 2), W / max(W // 8, 2)),
                               order=1)[:, :H, :W]
    image += lung_w * tex
    # Soft-tissue texture (fat, muscle): a little mottle everywhere inside the body.
    image += 6.0 * _smooth_noise(rng_tex, (K, H, W), [0.0, 1.5 / sxy, 1.5 / sxy]) * (image > -500)

    # Vessels: the tree, inside the lungs, fading out near the nodule (the hard cases add contacts).
    grid_origin = np.array([z[0], grid_offset[0] * sxy, grid_offset[1] * sxy])
    coarse = 4
    cz = np.array([z.min() - 200.0, z.max() + 200.0])
    xs = (np.arange(scan_size // coarse) * coarse) * sxy
    g_mid = anat.geometry(xs[None, :] - anat.centre[0], xs[:, None] - anat.centre[1], anat.level(0.0))
    lung_coarse = g_mid["lung"] < -1.0
    z_lo, z_hi = -anat.level0 * anat.lung_height, (1.0 - anat.level0) * anat.lung_height

    def inside(points):
        iy = np.clip((points[:, 1] / (coarse * sxy)).astype(int), 0, lung_coarse.shape[0] - 1)
        ix = np.clip((points[:, 2] / (coarse * sxy)).astype(int), 0, lung_coarse.shape[1] - 1)
        return lung_coarse[iy, ix] & (points[:, 0] > z_lo) & (points[:, 0] < z_hi)

    segs = vessel_tree(rng_anat, anat, inside, (float(cz[0]), float(cz[1])))
    zmin, zmax = z.min() - 8.0, z.max() + 8.0
    keep = (np.minimum(segs[:, 0], segs[:, 3]) < zmax) & (np.maximum(segs[:, 0], segs[:, 3]) > zmin)
    tubes = render_segments(segs[keep], (K, H, W), spacing_zyx, grid_origin, max(soft, 0.35))
    if marked.size:
        box = _nodule_box(union, [int(np.ceil(12.0 / s)) for s in spacing_zyx])
        clear = ndimage.distance_transform_edt(~union[box], sampling=spacing_zyx)
        tubes[box] *= _smoothstep(1.5, 4.0, clear).astype(np.float32)
    vessel_hu = 40.0 + rng_anat.uniform(-10, 20)
    image += tubes * lung_w * (vessel_hu - image)
    info["vessel_segments"] = int(keep.sum())

    # The nodule (generator v1 density model), then the hard case.
    if marked.size:
        box = _nodule_box(union, [int(np.ceil(5.0 / s)) for s in spacing_zyx])
        looks = case.rendering_ratings(ratings) if case is not None else ratings
        opacity, nodule_hu = _nodule_density(rng_nod, reader_masks, spacing_zyx, looks, box)
        image[box] += opacity * (nodule_hu - image[box])
    if case is not None and getattr(case, "name", "plain") not in ("plain", "juxta_pleural"):
        applied = case.apply(image.copy(), reader_masks, spacing_zyx)
        if getattr(case, "name", "") == "partial_volume":
            image = applied
        else:  # local structures: only in the lungs, within ~30 mm of the nodule
            keep_w = lung_w.copy()
            if marked.size:
                pts = np.argwhere(union).mean(axis=0) * np.array(spacing_zyx)
                zz, yy, xx = [np.arange(n)[tuple(slice(None) if a == i else None for a in range(3))] * s
                              for i, (n, s) in enumerate(zip((K, H, W), spacing_zyx))]
                far = np.sqrt((zz - pts[0]) ** 2 + (yy - pts[1]) ** 2 + (xx - pts[2]) ** 2)
                keep_w *= _smoothstep(40.0, 25.0, far).astype(np.float32)
            keep_w = np.maximum(keep_w, union.astype(np.float32))
            image += keep_w * (applied - image)

    # CT noise, correlated in-plane by the reconstruction kernel.
    sigma = float(noise_hu) if noise_hu is not None else float(rng_tex.uniform(12.0, 26.0))
    image += sigma * _smooth_noise(rng_tex, (K, H, W), [0.0, 0.6, 0.6])
    info["noise_hu"] = sigma
    return to_phantom_volume(image, spacing, origin, reader_masks, ratings,
                             (0, int(grid_offset[0]), int(grid_offset[1])), info)
