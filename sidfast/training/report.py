"""What a run reports: metrics.jsonl, the loss-curve plot, a summary table, and its result (its sample grids
are written by ``sidfast.utils.images``). Every file is written to a temporary name and renamed, so readers
never see half a file."""
from __future__ import annotations

import json
from pathlib import Path


from sidfast.utils.files import atomic_write


class MetricsLog:
    """Appends one JSON object per line to ``path`` (rank 0 only in distributed runs)."""

    def __init__(self, path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def read(self) -> list[dict]:
        return read_metrics(self.path)


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line, e.g. after a kill, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


LOSS_KEYS = ("loss_g", "loss_fake", "loss_gan", "loss_d", "logit_real", "logit_fake")


def plot_losses(records: list[dict], path, keys=LOSS_KEYS) -> Path | None:
    """Loss curves (one panel per key, against the iteration) as a PNG; None when there is nothing to plot.
    Keys no record holds get no panel (a SiD run has no GAN loss, discriminator loss or logits)."""
    series = {k: [(r["iteration"], r[k]) for r in records if k in r and "iteration" in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib  # matplotlib stays optional: only the loss plot needs it (and Agg before pyplot)

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (k, pts) in zip(axes[0], series.items()):
        it, val = zip(*pts)
        ax.plot(it, val, lw=1)
        ax.set_xlabel("iteration")
        ax.set_title(k)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def run_summary(iteration: int, ran: int, nimg: int, batch: int, seconds: float, last: dict, processes: int,
                device, checkpoint, interrupted, complete: bool = False, extra_keys=(),
                training_seconds: float | None = None) -> dict:
    """summary.json of a distill run: counters, the wall time of this process's part (``seconds``: setup,
    grids and checkpoints included), its speed (``it_per_s``, ``img_per_s``: the ``ran`` iterations over
    ``training_seconds``, the time of the iterations alone, as metrics.jsonl's speed is; ``seconds`` when
    not given), the last averaged losses (and ``extra_keys`` of the last metrics record), where it saved."""
    timed = seconds if training_seconds is None else training_seconds
    summary = {"iterations": iteration, "iterations_this_run": ran, "images": nimg, "seconds": round(seconds, 3),
               "training_seconds": round(timed, 6),
               "it_per_s": ran / max(timed, 1e-9), "img_per_s": ran * batch / max(timed, 1e-9),
               "loss_g": last.get("loss_g"), "loss_fake": last.get("loss_fake"), "processes": processes,
               "device": str(device), "checkpoint": str(checkpoint) if checkpoint else None,
               "interrupted": interrupted}
    summary.update({k: last[k] for k in extra_keys if k in last})
    if complete:
        summary["complete_before_start"] = True
    return summary


def summary_table(rows: list[tuple[str, object]], title: str = "summary") -> str:
    """A two-column plain-text table."""
    cells = [(str(k), v if isinstance(v, str) else _fmt(v)) for k, v in rows]
    kw = max([len(k) for k, _ in cells] + [len(title)])
    vw = max([len(v) for _, v in cells] + [1])
    line = f"+{'-' * (kw + 2)}+{'-' * (vw + 2)}+"
    out = [line, f"| {title.ljust(kw)} | {''.ljust(vw)} |", line]
    out += [f"| {k.ljust(kw)} | {v.ljust(vw)} |" for k, v in cells]
    out.append(line)
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


__all__ = ["MetricsLog", "read_metrics", "plot_losses", "summary_table", "LOSS_KEYS", "run_summary"]
