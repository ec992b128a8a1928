"""What `flareseg demo` builds and where it writes it: the organs, the label map, the FLARE21 protocol, the file
names of the demo folder and the settings (`DemoSettings`); shared by the run (flareseg.demo) and its report
(flareseg.demo_report)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flareseg.data.phantom.sites import resolve_site
from flareseg.evaluation import get_preset

ORGANS = ("liver", "kidney", "spleen", "pancreas")  # FLARE21's four, as its EfficientSegmentation segments them
# Phantom labels are numbered as in FLARE22; FLARE21 merges the right (2) and left (13) kidney into one label.
LABEL_MAP = {1: 1, 2: 2, 13: 2, 3: 3, 4: 4}
# The official FLARE21 protocol (`flareseg evaluate --preset flare21` gives the same numbers): it reads the ground
# truth in FLARE22 numbering as it is (2 and 13 are the kidney) and takes NSD at 1 mm.
PRESET = get_preset("flare21")
MARKER = "demo.json"
REPORT = "report.md"
PREDICT_CONFIG = "predict.yaml"  # the trained networks as a config for `sh predict.sh`
PLAN = "plan"  # flareseg plan's config folder (and fingerprint) for the phantoms
PLANNED_FILES = ("data_prepare.yaml", "coarse.yaml", "fine.yaml", "predict.yaml", "fingerprint.json")
MIN_STAGE_SECONDS = 0.0  # a budget of 0 still trains (and validates) one epoch


class DemoError(Exception):
    """A demo that cannot start: a negative budget, or an output folder that is not the demo's."""


@dataclass(frozen=True)
class DemoSettings:
    """What the demo builds and trains; the defaults learn on 2 CPU cores in the default 10 minutes."""

    train_cases: int = 10  # labeled phantoms to train on; fold 0 of a 5-fold split keeps 2 of them to validate
    test_cases: int = 4  # held-out phantoms: predicted, evaluated, shown
    # Phantom sites (flareseg.data.phantom.SITES) the cases come from, shared out in turn (training and held-out
    # cases alike): two contrast phases, kernels, noise levels and fields of view, so that the scores are not those
    # of one idealised scanner; the report gives them per site.
    sites: tuple[str, ...] = ("portal_venous", "arterial_sharp")
    shape: tuple[int, int, int] = (64, 160, 160)  # phantom voxels (z, y, x) before the random axis order
    seed: int = 0
    # flareseg plan decides each grid's shape; these cap its voxels (coarse_size^3, fine_size^3) for CPU time
    coarse_size: int = 32
    fine_size: int = 48
    coarse_channels: tuple[int, ...] = (8, 16, 32, 64)  # BaseUNet widths
    fine_channels: tuple[int, ...] = (8, 16, 32, 64, 64)  # EfficientSegNet widths
    batch_size: int = 2  # torch's CPU conv3d runs these shapes 2x faster per step at batch 2 than at batch 1
    steps_per_epoch: int = 8  # short epochs: the time budget is checked after each
    lr: float = 0.01  # Adam, constant: the budget, not an epoch count, ends training
    coarse_share: float = 0.35  # of the training time; the fine network is slower per step and matters more
    reserve_seconds: float = 60.0  # kept from training for prediction, evaluation and the report
    val_every: int = 10  # epochs between validations (the last epoch always validates)

    def __post_init__(self):
        if not self.sites or len(set(self.sites)) != len(self.sites):
            raise DemoError(f"sites must name one or more different phantom sites, got {list(self.sites)}")
        for site in self.sites:
            try:
                resolve_site(site)
            except ValueError as error:
                raise DemoError(str(error)) from None


# Tiny phantoms and networks: seconds per phase, for smoke runs (tests, bench --tiny); the real defaults are above.
SMOKE_SETTINGS = DemoSettings(
    train_cases=5,
    test_cases=2,
    shape=(28, 48, 48),
    coarse_size=24,
    fine_size=32,
    coarse_channels=(4, 8, 8, 16),
    fine_channels=(4, 8, 8, 16, 16),
    steps_per_epoch=2,
    reserve_seconds=0.0,
)


@dataclass
class DemoResult:
    """What a demo run produced: the evaluation summary (flareseg.evaluation), phase times and the report."""

    out: Path
    summary: dict
    phases: dict[str, float]
    report: Path

    @property
    def mean_dsc(self) -> float:
        return self.summary["mean"]["dsc"]


def scores_csv(out: Path) -> Path:
    """The per-case, per-organ scores of a demo folder."""
    return out / "evaluation" / "scores.csv"
