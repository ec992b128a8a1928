"""A reference patient seen at a site: the site's body size and fat, organ sizes, contrast-phase HU, noise level,
the chest and pelvis of a long field of view, and the organs' interiors.

`adapt_anatomy` takes the patient that `anatomy.sample_anatomy` drew for a seed and changes it as the site says,
drawing from the site's own random stream (so the reference generator never sees these draws).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from flareseg.data.phantom.anatomy import Anatomy, Organ
from flareseg.data.phantom.body import Body
from flareseg.data.phantom.interior import Interior, sample_interiors
from flareseg.data.phantom.shapes import Ellipsoid, Field, Segment
from flareseg.data.phantom.sites import PHASES, Site

# Which row of the phase table gives each organ's HU (the kidneys' is their cortex; the interior adds the rest).
_HU_ROW = {
    "liver": "liver",
    "spleen": "spleen",
    "stomach": "stomach",
    "right_kidney": "renal_cortex",
    "left_kidney": "renal_cortex",
    "pancreas": "pancreas",
    "duodenum": "duodenum",
    "gallbladder": "gallbladder",
    "inferior_vena_cava": "inferior_vena_cava",
    "aorta": "aorta",
    "esophagus": "esophagus",
    "right_adrenal_gland": "adrenal",
    "left_adrenal_gland": "adrenal",
}
# A chest-abdomen-pelvis scan reaches the lung apices and the bladder (all label 0), body-centred mm:
# lungs (centre, radii) with the reference lungs' bases (z about 120), the heart above the liver dome, the bladder.
_CHEST_LUNGS = (((-85.0, 20.0, 265.0), (62.0, 72.0, 145.0)), ((85.0, 20.0, 260.0), (58.0, 72.0, 140.0)))
_HEART = ((15.0, -20.0, 218.0), (62.0, 50.0, 55.0))
_BLADDER = ((0.0, -40.0, -245.0), (48.0, 40.0, 38.0))
_VISCERAL_FAT_HU = 100.0  # HU darker inner cavity per unit of body scale above 1 (more visceral fat)


def phase_hu(site: Site, rng: np.random.Generator) -> Callable[[str], float]:
    """A draw of HU per structure for one patient: non-contrast HU plus the phase's enhancement times one patient
    factor (cardiac output, weight), plus the structure's own spread (clipped at two standard deviations)."""
    phase, plain = PHASES[site.phase], PHASES["non_contrast"]
    gain = float(np.clip(rng.normal(1.0, 0.12), 0.7, 1.3))

    def hu(name: str) -> float:
        (mean, spread), base = phase[name], plain[name][0]
        return base + gain * (mean - base) + float(np.clip(rng.normal(0.0, spread), -2 * spread, 2 * spread))

    return hu


def adapt_anatomy(anatomy: Anatomy, site: Site, rng: np.random.Generator) -> tuple[Anatomy, dict[str, Interior]]:
    """The patient at `site` and the interior of each organ (by name); a fixed draw order for a given site."""
    hu = phase_hu(site, rng)
    body = _adapt_body(anatomy.body, site, rng, hu("muscle"))
    scale = rng.uniform(*site.organ_scale)
    organs = tuple(replace(_scaled(organ, scale), hu=hu(_HU_ROW[organ.name])) for organ in anatomy.organs)
    lungs = anatomy.lungs
    if site.fov == "chest_abdomen_pelvis":
        lungs = _chest_and_pelvis(lungs, rng, blood=hu("aorta"), urine=hu("bladder"))
    adapted = replace(anatomy, body=body, lungs=lungs, organs=organs, noise_std=rng.uniform(*site.noise_std))
    return adapted, sample_interiors(adapted.organs, hu, site.phase, rng)


def _adapt_body(body: Body, site: Site, rng: np.random.Generator, muscle_hu: float) -> Body:
    scale = rng.uniform(*site.body_scale)
    fat = rng.uniform(*site.fat_mm)
    return replace(
        body,
        a=body.a * scale,
        b=body.b * scale,
        fat=fat,
        hu_muscle=muscle_hu,
        hu_inner=body.hu_inner - _VISCERAL_FAT_HU * max(scale - 1.0, 0.0),
    )


def _scaled(organ: Organ, factor: float) -> Organ:
    """The organ with every part's size (not its position) times `factor`."""
    parts = []
    for part in organ.parts:
        if isinstance(part, Ellipsoid):
            cut = None if part.cut is None else (part.cut[0], part.cut[1] * factor)
            parts.append(Ellipsoid(part.centre, part.radii * factor, part.rotation, cut))
        elif isinstance(part, Segment):
            parts.append(Segment(part.a, part.b, part.ra * factor, part.rb * factor))
        else:
            raise TypeError(f"cannot scale a {type(part).__name__}")
    return replace(organ, parts=tuple(parts))


def _chest_and_pelvis(lungs: tuple[Organ, ...], rng: np.random.Generator, blood: float, urine: float):
    """Taller lungs (keeping each lung's HU and deformation), a heart (blood HU) and a bladder (urine HU)."""
    out = []
    for lung, (centre, radii) in zip(lungs, _CHEST_LUNGS, strict=True):
        centre = np.asarray(centre) + rng.uniform(-5, 5, 3)
        radii = np.asarray(radii) * rng.uniform(0.92, 1.08)
        out.append(replace(lung, parts=(Ellipsoid(centre, radii, np.eye(3)),), anchor=centre))
    for name, (centre, radii), hu in (("heart", _HEART, blood), ("bladder", _BLADDER, urine)):
        centre = np.asarray(centre) + rng.uniform(-6, 6, 3)
        radii = np.asarray(radii) * rng.uniform(0.85, 1.15)
        field = Field.sample(rng, 0.08, radii * 2)
        out.append(Organ(name, 0, hu, (Ellipsoid(centre, radii, np.eye(3)),), field, centre))
    return tuple(out)
