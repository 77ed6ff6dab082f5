"""Metrics to CSV and TensorBoard, and a progress bar: rank 0 only (others get a no-op)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

# the time split (``Learner.time_split``): shares of the wall time since this process started
# training, averaged over ranks; they add up to 1
SHARE_COLUMNS = ["compute_share", "allreduce_share", "wait_share", "bubble_share", "other_share"]
COLUMNS = ["env_steps", "updates", "episodes", "episodic_return", "episodic_length", "loss",
           "mean_q", "epsilon", "lr", "sps", "ups", *SHARE_COLUMNS, "rss_mb", "wall_s"]


def share_columns(split: dict) -> dict:
    """The metrics row's share columns from a ``Learner.time_split`` result."""
    return {c: split["shares"][c[:-len("_share")]] for c in SHARE_COLUMNS}


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, progress: bool,
                 total: int, append: bool = False):
        self.enabled = enabled
        self._csv = self._writer = self._tb = self._bar = None
        if not enabled:
            return
        path = Path(run_dir) / "metrics.csv"
        new = not (append and path.exists())
        self._csv = open(path, "w" if new else "a", newline="")
        self._writer = csv.DictWriter(self._csv, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            self._writer.writeheader()
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                print("hpcdqn: tensorboardX not installed; no TensorBoard events", file=sys.stderr)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr,
                             mininterval=0.5, smoothing=0.1, leave=True)

    def progress(self, n: int, postfix: dict | None = None) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def note(self, msg: str) -> None:
        """A line on stderr that does not tear the progress bar."""
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._writer.writerow(row)
        self._csv.flush()
        if self._tb is not None:
            step = int(row["env_steps"])
            for k, v in row.items():
                if k != "env_steps" and v is not None and v == v:
                    self._tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._csv is not None:
            self._csv.close()
        if self._tb is not None:
            self._tb.close()
