"""What a training run shows: a JSONL line per epoch, a training-curve PNG, optional TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from flareseg.atomic import atomic_write, atomic_write_text

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "training_curve.png"


class RunLog:
    """Written by rank 0 only. `history` is the list of epoch records, also kept in checkpoints."""

    def __init__(self, out_dir: Path, history: list[dict] | None = None, tensorboard: bool = False):
        self.out_dir = Path(out_dir)
        self.history = list(history or [])
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise RuntimeError(
                    "train.tensorboard needs the tensorboard package: pip install tensorboard"
                ) from error
            self._writer = SummaryWriter(str(self.out_dir / "tensorboard"))

    def add(self, record: dict, plot: bool = True) -> None:
        """Record one epoch: rewrite the JSONL (so a resumed run never shows epochs twice) and maybe the curve."""
        self.history = [r for r in self.history if r["epoch"] < record["epoch"]] + [record]
        atomic_write_text(self.out_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in self.history))
        if plot:
            self._plot()
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._writer.add_scalar(key, value, record["epoch"])
            for organ, value in record.get("val_dice", {}).items():
                self._writer.add_scalar(f"val_dice/{organ}", value, record["epoch"])
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.history]
        figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=100)
        loss_axis.plot(epochs, [r["train_loss"] for r in self.history], color="tab:blue", label="train loss")
        loss_axis.set_xlabel("epoch")
        loss_axis.set_ylabel("train loss", color="tab:blue")
        validated = [r for r in self.history if r.get("val_dice_mean") is not None]
        if validated:
            dice_axis = loss_axis.twinx()
            dice_axis.plot(
                [r["epoch"] for r in validated],
                [r["val_dice_mean"] for r in validated],
                color="tab:red",
                marker="o",
                label="validation Dice",
            )
            dice_axis.set_ylabel("mean validation Dice", color="tab:red")
            dice_axis.set_ylim(0, 1)
        figure.tight_layout()
        try:
            atomic_write(self.out_dir / CURVE_FILE, figure.savefig)
        finally:
            plt.close(figure)
