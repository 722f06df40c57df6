"""Training metrics: a CSV log (appended, so a resumed run continues the same file) and optional
TensorBoard scalars (needs the ``tensorboard`` package)."""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = (
    "step",
    "generator_loss",
    "critic_loss",
    "reward",
    "weight",
    "generator_grad_norm",
    "critic_grad_norm",
    "exit_step",
    "seconds",
)


class MetricsLog:
    def __init__(self, folder: str | Path, tensorboard: bool = False, resume_step: int = 0) -> None:
        self.path = Path(folder) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.is_file():
            self._truncate_after(resume_step)
        new = not self.path.is_file()
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            self._csv.writeheader()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    "run.tensorboard needs the 'tensorboard' package (pip install tensorboard)"
                ) from err
            self._tb = SummaryWriter(str(Path(folder) / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Drop rows of steps that the resumed run will redo (written after the checkpoint)."""
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) < step]
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        self._csv.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
