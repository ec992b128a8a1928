"""Phantom sites: named, reproducible acquisition and population settings (scanner, protocol, patients).

A site fixes the contrast phase (the HU of every organ and vessel), the reconstruction kernel (blur and noise),
the slice thickness and in-plane spacing ranges, the field of view, the body size and fat, how much organ sizes
vary, and optional artefacts (a spinal implant's metal streaks, a field of view narrower than the body). Cases of
one site labeled and of other sites unlabeled make a domain-shift benchmark. `make_phantom(seed, site=None)` is the
reference generator, unchanged; a site phantom of the same seed is the same patient seen at that site.

Contrast phases (`PHASES`: mean HU and the spread between patients, one standard deviation). The values are
typical figures from the radiology literature as remembered when this table was written (not re-checked against
the papers here), rounded; the phantoms need their order and rough size, not a precise scanner's values:
  - non-contrast: liver 50-65 HU and 8-10 HU above the spleen (hepatic steatosis studies, e.g. Park et al.,
    Radiology 2006); kidney 30-35; unenhanced blood 35-50 (depends on haematocrit); bile and urine 0-20; adrenal
    10-30; muscle 40-60.
  - arterial (late arterial / pancreatic phase, about 35-40 s): aorta 250-350 (Bae, Radiology 2010, aortic
    enhancement curves); corticomedullary kidney, cortex about 180 and medulla about 90 (Yuh and Cohan, AJR 1999:
    corticomedullary 25-70 s, nephrographic 80-120 s, excretory from 3 min); pancreas at its peak (100-130); liver
    only slightly enhanced (65-80); spleen 90-110 with an arciform (zebra) pattern; portal vein partly enhanced;
    hepatic veins and the infrarenal IVC still nearly unenhanced.
  - portal-venous (about 70 s): liver 100-120 (about 50-60 HU of enhancement, Heiken et al., Radiology 1995);
    spleen 110-130; kidneys homogeneous about 170 (early nephrographic); aorta 150-190; IVC 140-160; portal vein
    the brightest vessel in the liver (170-190), hepatic veins enhanced (140-160).
  - delayed (equilibrium, 3-5 min): liver about 80, spleen 85, blood 110-130, kidney parenchyma about 100 with
    contrast in the collecting system (a few hundred HU, rising with time).
A patient's enhancement (HU above non-contrast) is scaled by one factor for all organs (cardiac output, weight),
and each organ adds its own spread.

Kernels (`KERNELS`, in-plane Gaussian sigma in voxels): sharp 0.45 (fine-grained noise, neighbour correlation
about 0.2), standard 0.7 (the reference generator's), soft 1.1 (blotchy noise, neighbour correlation about 0.8).
Noise std is the HU standard deviation after the blur, drawn per case from the site's range; sharp and low-dose
sites are the noisiest. Fields of view (`FIELDS_OF_VIEW`, scan length along z): upper abdomen (liver dome to the
lower kidney poles), abdomen (the reference generator's), chest-abdomen-pelvis (lung apices to the bladder, with
taller lungs, a heart and a bladder added, label 0).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from flareseg.data.phantom.grid import Acquisition

# structure: (non-contrast, arterial, portal-venous, delayed), each (mean HU, spread between patients).
_HU_TABLE = {
    "liver": ((55, 6), (70, 8), (110, 12), (80, 8)),
    "spleen": ((45, 5), (100, 15), (120, 12), (85, 8)),
    "pancreas": ((40, 5), (115, 15), (100, 12), (75, 8)),
    "renal_cortex": ((32, 5), (180, 25), (170, 20), (100, 12)),
    "renal_medulla": ((30, 5), (85, 15), (160, 20), (105, 12)),
    "collecting_system": ((8, 4), (12, 5), (20, 6), (300, 80)),
    "aorta": ((42, 5), (300, 50), (170, 20), (120, 12)),
    "inferior_vena_cava": ((40, 5), (90, 20), (150, 20), (115, 12)),
    "portal_vein": ((40, 5), (140, 25), (180, 20), (115, 12)),
    "hepatic_vein": ((40, 5), (55, 8), (150, 20), (115, 12)),
    "stomach": ((25, 6), (35, 8), (40, 8), (35, 8)),  # mostly contents; the wall enhances little of the mean
    "duodenum": ((30, 6), (45, 8), (55, 8), (45, 8)),
    "esophagus": ((40, 6), (55, 8), (65, 8), (55, 8)),
    "gallbladder": ((10, 5), (10, 5), (12, 5), (12, 5)),
    "adrenal": ((20, 8), (55, 10), (60, 10), (45, 8)),
    "muscle": ((50, 4), (55, 5), (60, 5), (55, 5)),
    "bladder": ((8, 4), (8, 4), (10, 5), (60, 30)),
}
PHASE_NAMES = ("non_contrast", "arterial", "portal_venous", "delayed")
PHASES: dict[str, dict[str, tuple[float, float]]] = {
    phase: {name: values[index] for name, values in _HU_TABLE.items()} for index, phase in enumerate(PHASE_NAMES)
}
KERNELS = {"sharp": 0.45, "standard": 0.7, "soft": 1.1}  # in-plane blur sigma, voxels
# name: (scan length range mm, middle of the scan above the body centre mm)
FIELDS_OF_VIEW = {
    "upper_abdomen": ((180.0, 220.0), 40.0),
    "abdomen": ((240.0, 290.0), 30.0),
    "chest_abdomen_pelvis": ((560.0, 660.0), 40.0),
}
METAL = ("spine",)  # pedicle screws and rods over 2-3 lumbar levels
_MIN_BODY_WIDTH = 2 * 160.0 * 0.94  # mm: the narrowest reference body (anatomy.sample_anatomy), before body_scale


def _range(name: str, value: tuple[float, float]) -> None:
    if len(value) != 2 or not 0 < value[0] <= value[1]:
        raise ValueError(f"{name} must be a range (low, high) with 0 < low <= high, got {value}")


@dataclass(frozen=True)
class Site:
    """One site's settings; every range is drawn from uniformly, per case."""

    name: str  # case ids of a written dataset are <name>_000, <name>_001, ...
    phase: str  # a key of PHASES: the organ and vessel HU
    kernel: str  # a key of KERNELS: the in-plane blur
    noise_std: tuple[float, float]  # HU, after the blur
    in_plane: tuple[float, float]  # pixel size, mm
    slice_thickness: tuple[float, float]  # mm (contiguous slices: spacing = thickness)
    fov: str  # a key of FIELDS_OF_VIEW: the scan length and where it lies
    fov_xy: tuple[float, float]  # in-plane field of view (reconstruction diameter), mm
    body_scale: tuple[float, float]  # times the reference body outline's semi-axes
    fat_mm: tuple[float, float]  # subcutaneous fat thickness
    organ_scale: tuple[float, float]  # one factor per patient on every organ's size, on top of the reference spread
    metal: str | None = None  # None or a name in METAL
    truncated: bool = False  # the field of view is narrower than the body (checked): cut-off body and a bright rim
    description: str = ""

    def __post_init__(self) -> None:
        checks = (
            ("phase", self.phase, PHASES),
            ("kernel", self.kernel, KERNELS),
            ("fov", self.fov, FIELDS_OF_VIEW),
        )
        for field, value, choices in checks:
            if value not in choices:
                raise ValueError(f"site {self.name!r}: {field} must be one of {sorted(choices)}, got {value!r}")
        if self.metal is not None and self.metal not in METAL:
            raise ValueError(f"site {self.name!r}: metal must be None or one of {METAL}, got {self.metal!r}")
        for field in ("noise_std", "in_plane", "slice_thickness", "fov_xy", "body_scale", "fat_mm", "organ_scale"):
            _range(f"site {self.name!r}: {field}", getattr(self, field))
        narrowest = _MIN_BODY_WIDTH * self.body_scale[0]
        if self.truncated and self.fov_xy[1] + 10.0 > narrowest:  # + 10: the field of view's random shift
            raise ValueError(
                f"site {self.name!r}: truncated needs fov_xy below the narrowest body ({narrowest:.0f} mm) by "
                f"10 mm, got up to {self.fov_xy[1]} mm"
            )

    @property
    def acquisition(self) -> Acquisition:
        length, centre = FIELDS_OF_VIEW[self.fov]
        return Acquisition(self.fov_xy, length, self.in_plane, self.slice_thickness, centre)

    @property
    def blur_sigma(self) -> float:
        return KERNELS[self.kernel]


SITES: dict[str, Site] = {
    site.name: site
    for site in (
        Site(
            "portal_venous",
            "portal_venous",
            "standard",
            noise_std=(10.0, 18.0),
            in_plane=(0.7, 0.8),
            slice_thickness=(2.5, 3.0),
            fov="abdomen",
            fov_xy=(360.0, 400.0),
            body_scale=(0.97, 1.03),
            fat_mm=(10.0, 25.0),
            organ_scale=(0.95, 1.05),
            description="the labeled home site: routine portal-venous abdomen",
        ),
        Site(
            "arterial_sharp",
            "arterial",
            "sharp",
            noise_std=(22.0, 32.0),
            in_plane=(0.6, 0.75),
            slice_thickness=(1.0, 1.5),
            fov="upper_abdomen",
            fov_xy=(340.0, 380.0),
            body_scale=(0.92, 1.05),
            fat_mm=(8.0, 22.0),
            organ_scale=(0.9, 1.1),
            description="late arterial liver / pancreas protocol, thin slices, sharp kernel",
        ),
        Site(
            "non_contrast_lowdose",
            "non_contrast",
            "soft",
            noise_std=(20.0, 28.0),
            in_plane=(0.75, 0.9),
            slice_thickness=(5.0, 5.0),
            fov="abdomen",
            fov_xy=(380.0, 420.0),
            body_scale=(0.92, 1.1),
            fat_mm=(10.0, 30.0),
            organ_scale=(0.9, 1.1),
            description="unenhanced low-dose scan (e.g. for stones), soft kernel, 5 mm slices",
        ),
        Site(
            "delayed_large",
            "delayed",
            "standard",
            noise_std=(16.0, 26.0),
            in_plane=(0.86, 0.98),
            slice_thickness=(3.0, 5.0),
            fov="chest_abdomen_pelvis",
            fov_xy=(440.0, 500.0),
            body_scale=(1.25, 1.4),
            fat_mm=(30.0, 55.0),
            organ_scale=(1.0, 1.2),
            description="delayed phase, large patients with thick fat, chest-abdomen-pelvis",
        ),
        Site(
            "portal_venous_metal",
            "portal_venous",
            "standard",
            noise_std=(12.0, 20.0),
            in_plane=(0.5, 0.6),
            slice_thickness=(2.5, 3.0),
            fov="abdomen",
            fov_xy=(240.0, 280.0),
            body_scale=(1.0, 1.06),
            fat_mm=(10.0, 25.0),
            organ_scale=(0.95, 1.05),
            metal="spine",
            truncated=True,
            description="portal-venous with a lumbar spinal fusion (metal streaks), field of view cutting the body",
        ),
        Site(
            "portal_venous_thick",
            "portal_venous",
            "soft",
            noise_std=(8.0, 14.0),
            in_plane=(0.8, 0.98),
            slice_thickness=(5.0, 5.0),
            fov="upper_abdomen",
            fov_xy=(400.0, 500.0),
            body_scale=(0.97, 1.08),
            fat_mm=(10.0, 30.0),
            organ_scale=(0.95, 1.05),
            description="the home phase on an older protocol: 5 mm slices, soft kernel, upper abdomen",
        ),
    )
}


def resolve_site(site: str | Site | None) -> Site | None:
    """The Site for a name of SITES (or the Site itself, or None); an unknown name raises with the choices."""
    if site is None or isinstance(site, Site):
        return site
    if site in SITES:
        return SITES[site]
    close = difflib.get_close_matches(str(site), SITES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown phantom site {site!r}{hint}; choose from: {', '.join(SITES)}")


def sites_table() -> str:
    """The sites as a Markdown table (name, phase, spacing, slice thickness, noise, kernel, FOV, body, artefacts),
    then a line on each."""

    def span(value: tuple[float, float], unit: str = "") -> str:
        low, high = value
        return f"{low:g}{unit}" if low == high else f"{low:g}-{high:g}{unit}"

    rows = [
        "| site | phase | in-plane mm | slice mm | noise HU | kernel | field of view, length x width mm | body "
        "| artefacts |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for site in SITES.values():
        artefacts = [f"metal ({site.metal})"] if site.metal else []
        artefacts += ["truncated"] if site.truncated else []
        fov = f"{site.fov.replace('_', '-')}, {span(FIELDS_OF_VIEW[site.fov][0])} x {span(site.fov_xy)}"
        body = f"x{span(site.body_scale)}, fat {span(site.fat_mm)} mm"
        rows.append(
            f"| {site.name} | {site.phase.replace('_', '-')} | {span(site.in_plane)} | {span(site.slice_thickness)} "
            f"| {span(site.noise_std)} | {site.kernel} ({site.blur_sigma:g} vx) | {fov} | {body} "
            f"| {', '.join(artefacts) or '-'} |"
        )
    return "\n".join([*rows, "", *(f"{site.name}: {site.description}" for site in SITES.values())])
