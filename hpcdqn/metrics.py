"""Metrics to CSV and TensorBoard, and a progress bar: rank 0 only (others get a no-op)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from hpcdqn.sysinfo import fmt_bytes

# the time split (``Learner.time_split``): shares of the wall time since this process started
# training, averaged over ranks; they add up to 1
SHARE_COLUMNS = ["compute_share", "allreduce_share", "wait_share", "bubble_share", "other_share"]
COLUMNS = ["env_steps", "updates", "episodes", "episodic_return", "episodic_length", "loss",
           "mean_q", "epsilon", "lr", "sps", "ups", *SHARE_COLUMNS, "rss_mb", "wall_s"]


EVAL_CSV = "eval.csv"        # periodic greedy evaluations (eval.every)
EVAL_COLUMNS = ["env_steps", "updates", "wall_s", "eval_return_mean", "eval_return_std",
                "eval_episodes", "eval_s"]
ROLES_CSV = "metrics_roles.csv"      # actor ranks (``actors`` > 0): each rank's role and time split
ROLE_COLUMNS = ["rank", "role", "learner", "wall_s",
                "env_s", "inference_s", "send_s", "wait_s", "env_steps", "transitions_sent",
                "messages_sent", "weights_received",
                "receive_insert_s", "wait_data_s", "sample_s", "update_s", "compute_s",
                "allreduce_s", "inserted", "sampled"]
MEMORY_COLUMNS = ("parameters", "target", "gradients", "optimizer", "replay",
                  "activations_estimate")


def append_eval_row(run_dir: Path, row: dict) -> Path:
    """One row of ``eval.csv`` (its header first in a new file); returns the file's path. An
    OSError is raised for the caller to agree on."""
    path = Path(run_dir) / EVAL_CSV
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=EVAL_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
    return path


def write_roles_csv(run_dir: Path, rows: list[dict]) -> Path:
    """``metrics_roles.csv``: one row per rank of an actor-learner run (its role, the learner
    replica an actor feeds, its time split over this leg of the run: actor ``env_s``,
    ``inference_s``, ``send_s``, ``wait_s``; learner ``receive_insert_s``, ``wait_data_s``,
    ``sample_s``, ``update_s`` (of which ``compute_s``, ``allreduce_s``); a column a role does
    not have is empty). An OSError is raised for the caller to agree on."""
    path = Path(run_dir) / ROLES_CSV
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=ROLE_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
    return path


def start_lines(schedule_text: str, update_text: str, stage_contents, reports: list[dict],
                pp: int, dp: int) -> list[str]:
    """What rank 0 says once at start: the env-step schedule, how updates are computed, what
    each pipeline stage holds and the bytes by category of every rank (replica 0's at dp>1)."""
    lines = [f"hpcdqn: {schedule_text}", f"hpcdqn: update plan (rank 0): {update_text}"]
    if pp > 1:
        lines.append("hpcdqn: pipeline stages: " + "; ".join(
            f"{i}: {held}" for i, held in enumerate(stage_contents)))
    for r in reports[:pp] if dp > 1 else reports:
        lines.append(f"hpcdqn: memory rank {r['rank']} (stage {r['pp_rank']}): " + ", ".join(
            f"{k} {fmt_bytes(r[k])}" for k in MEMORY_COLUMNS)
            + f"; RSS baseline {fmt_bytes(r['baseline_rss'])}, planned peak "
              f"{fmt_bytes(r['planned_rss'])}, peak so far {fmt_bytes(r['peak_rss'])}")
    return lines


def share_columns(split: dict) -> dict:
    """The metrics row's share columns from a ``Learner.time_split`` result."""
    return {c: split["shares"][c[:-len("_share")]] for c in SHARE_COLUMNS}


class EventLog:
    """TensorBoard scalars written synchronously from the training thread (tensorboardX's
    ``EventsWriter``, no background thread): a write error surfaces here, where ``MetricsLogger``
    turns it into one warning and goes on without TensorBoard (a writer thread that dies would
    print a traceback, and its full queue would then block the training loop)."""

    def __init__(self, logdir: Path):
        from tensorboardX.event_file_writer import EventsWriter

        Path(logdir).mkdir(parents=True, exist_ok=True)
        self._w = EventsWriter(str(Path(logdir) / "events"))

    def scalars(self, row: dict, step: int, prefix: str = "train/") -> None:
        import time

        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for k, v in row.items():
            if k != "env_steps" and v is not None and v == v:
                self._w.write_event(Event(wall_time=time.time(), step=step,
                                          summary=scalar(prefix + k, float(v))))
        self._w.flush()

    def close(self) -> None:
        self._w.close()


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
            self._guard_csv(self._writer.writeheader)
        if tensorboard:
            try:
                self._tb = EventLog(Path(run_dir) / "tb")
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                print("hpcdqn: tensorboardX not installed; no TensorBoard events", file=sys.stderr)
            except OSError as e:
                self._tb_failed(e)
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
        """One row of metrics.csv (an OSError is raised, the file closed: the caller agrees on
        it and stops the run) and of TensorBoard (an error there: a warning, no more events)."""
        if not self.enabled:
            return
        self._guard_csv(lambda: (self._writer.writerow(row), self._csv.flush()))
        if self._tb is not None:
            try:
                self._tb.scalars(row, int(row["env_steps"]))
            except OSError as e:
                self._tb_failed(e)

    def _guard_csv(self, fn) -> None:
        try:
            fn()
        except OSError:
            f, self._csv, self.enabled = self._csv, None, False
            try:
                f.close()      # the buffered row is dropped here, not at interpreter exit
            except OSError:
                pass
            raise

    def _tb_failed(self, e: OSError) -> None:
        import errno

        tb, self._tb = self._tb, None
        what = f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}" if e.errno else str(e)
        self.note(f"hpcdqn: warning: TensorBoard events not written ({what}); "
                  "training goes on without TensorBoard")
        if tb is not None:
            try:
                tb.close()
            except OSError:
                pass

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._csv is not None:
            self._csv.close()
        if self._tb is not None:
            try:
                self._tb.close()
            except OSError as e:
                self._tb_failed(e)
