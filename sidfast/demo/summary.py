"""The side-by-side report of the demo's comparisons: per-seed numbers, their mean and spread, the bars.

Pure functions of numbers, so that the report format and the bars can be checked without training:
``summarize`` (per-seed values -> mean, standard deviation, range), the bars of each comparison
(``sida_bars``, ``conditional_bars``, ``steps_bars``), and ``markdown`` (the tables the demo prints and
writes). A bar is ``{"what", "value", "bar", "passed"}``; the comparison passes when every bar does, and
``sidfast demo`` exits 1 otherwise.
"""
from __future__ import annotations

import math
import operator

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
FD_RATIO_BAR = 1.25   # a guided conditional student's FD at most 1.25x the teacher's


def summarize(values) -> dict:
    """{"per_seed", "mean", "std" (sample standard deviation; 0 for one seed), "min", "max"} of floats."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize needs at least one value")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"summarize got a value that is not finite: {vals}")
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return {"per_seed": vals, "mean": mean, "std": math.sqrt(var), "min": min(vals), "max": max(vals)}


def bar(what: str, value: float, op: str, limit: float) -> dict:
    """One bar: ``value op limit`` must hold."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    return {"what": what, "value": float(value), "bar": f"{op} {limit:.6g}",
            "passed": bool(OPS[op](float(value), float(limit)))}


def _time_bar(seconds: float, limit: float) -> dict:
    return bar("wall-clock seconds of the whole comparison", seconds, "<=", limit)


def _mean(table: dict, name: str) -> float:
    if name not in table:
        raise ValueError(f"no results for {name!r}; have {', '.join(table)}")
    return table[name]["mean"]


def sida_bars(fd: dict, seconds: float, time_limit: float, sid: str = "sid", sida: str = "sida",
              teacher: str = "teacher") -> dict:
    """SiDA's headline (Zhou et al., ICLR 2025): its one-step student below the teacher's FD, and below the
    SiD student's at the same number of images. Ratios of the means over seeds."""
    return {"sida_vs_teacher": bar(f"FD {sida} / FD {teacher}", _mean(fd, sida) / _mean(fd, teacher), "<", 1),
            "sida_vs_sid": bar(f"FD {sida} / FD {sid}", _mean(fd, sida) / _mean(fd, sid), "<", 1),
            "time": _time_bar(seconds, time_limit)}


def best_by_fd(fd: dict, names) -> str:
    """The name among ``names`` with the lowest mean FD (the first on a tie)."""
    names = list(names)
    if not names:
        raise ValueError("best_by_fd needs at least one name")
    return min(names, key=lambda n: _mean(fd, n))


def conditional_bars(fd: dict, accuracy: dict, teachers, students, seconds: float, time_limit: float,
                     fd_ratio: float = FD_RATIO_BAR, samples: int | None = None) -> dict:
    """The guided student (the best of ``students`` by mean FD) against the teacher at its best guidance (the
    best of ``teachers`` by mean FD): label accuracy at least the teacher's, FD at most ``fd_ratio`` times.
    ``samples``: how many samples each accuracy is measured on in all (per seed times seeds); the accuracy
    bar then also names both error counts and the standard error of their difference as independent binomial
    samples (an approximation: the samples are paired by latent and label)."""
    teacher = best_by_fd(fd, teachers)
    student = best_by_fd(fd, students)
    acc_s, acc_t = _mean(accuracy, student), _mean(accuracy, teacher)
    precision = ""
    if samples is not None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        # compared as counts of hits: means over seeds of equal counts can differ in their last bit
        hits_s, hits_t = round(acc_s * samples), round(acc_t * samples)
        acc_s, acc_t = hits_s / samples, hits_t / samples
        # as if the two were independent binomial samples: var(p_s - p_t) = (p_s (1 - p_s) + p_t (1 - p_t)) / n;
        # approximate, since teacher and students share their latents and labels per seed
        se = math.sqrt((acc_s * (1 - acc_s) + acc_t * (1 - acc_t)) / samples)
        precision = (f"; {samples - hits_s} vs {samples - hits_t} errors in {samples} samples, standard error "
                     f"of the difference {se:.2g}")
    return {"accuracy_vs_teacher": bar(f"label accuracy of {student} (>= {teacher}'s{precision})",
                                       acc_s, ">=", acc_t),
            "fd_vs_teacher": bar(f"FD {student} / FD {teacher}", _mean(fd, student) / _mean(fd, teacher),
                                 "<=", fd_ratio),
            "time": _time_bar(seconds, time_limit)}


def steps_bars(fd: dict, one: str, many: str, seconds: float, time_limit: float) -> dict:
    """The few-step student below the one-step student's FD (ratio of the means over seeds)."""
    return {"steps_vs_one_step": bar(f"FD {many} / FD {one}", _mean(fd, many) / _mean(fd, one), "<", 1),
            "time": _time_bar(seconds, time_limit)}


def _pm(summary: dict | None, digits: int) -> str:
    if summary is None:
        return ""
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def markdown(title: str, fd: dict, accuracy: dict, seconds: dict, bars: dict) -> str:
    """The result table (one row per teacher or student: FD mean ± std, per seed; label accuracy; training
    seconds) and the bar table, in Markdown."""
    acc_cols = bool(accuracy)
    head = "| | FD (mean ± std) | FD per seed |"
    head += " label accuracy | accuracy per seed |" if acc_cols else ""
    head += " training s (mean) |"
    lines = [f"### {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, summary in fd.items():
        row = f"| {name} | {_pm(summary, 3)} | {', '.join(f'{v:.3f}' for v in summary['per_seed'])} |"
        if acc_cols:
            acc = accuracy.get(name)
            # four decimals: one sample in a few thousand
            per = ", ".join(f"{v:.4f}" for v in acc["per_seed"]) if acc else ""
            row += f" {_pm(acc, 4)} | {per} |"
        train = seconds.get(name)
        row += f" {train['mean']:.1f} |" if train else " |"
        lines.append(row)
    lines += ["", "| bar | value | needs | |", "|---|---|---|---|"]
    for name, b in bars.items():
        lines.append(f"| {name}: {b['what']} | {b['value']:.4g} | {b['bar']} | "
                     f"{'ok' if b['passed'] else 'FAILED'} |")
    return "\n".join(lines) + "\n"
