"""The side-by-side report of the demo's comparisons: per-seed numbers, their mean and spread, the bars.

Pure functions of numbers, so that the report format and the bars can be checked without training:
``summarize`` (per-seed values -> mean, standard deviation, range), the bars of the SiD demo and of each
comparison (``sid_bars``, ``sida_bars``, ``conditional_bars``, ``steps_bars``), and ``markdown`` (the tables
the demo prints and writes). A bar is ``{"what", "value", "bar", "passed", "margin", "se"}``; the
comparison passes when every bar does, and ``sidfast demo`` exits 1 otherwise.

Every comparative bar is a statistical statement about an estimate with a standard error (SE), not a
comparison of two noisy numbers. Its ``margin`` is the distance from the value to the bar's limit, signed so
that a positive margin is on the side the bar asks for (``limit - value`` for an upper limit, ``value -
limit`` for a lower one), and with ``NOISE_SE = 2``:

- "below" / "above" (superiority: the student is better by more than the noise): ``margin > 2 SE``.
  SiDA's FD below the teacher's and below SiD's, the K-step student's below the one-step student's (ratio
  of mean FDs ``+ 2 SE < 1``), the generator at initialization above 3x the SiD student's FD by more than
  the noise (``ratio - 2 SE > 3``).
- "at least" / "within" (non-inferiority: the student is not worse by more than the noise):
  ``margin >= -2 SE``. The guided student's label accuracy at least the teacher's (``acc_student >=
  acc_teacher - 2 SE``), its FD and the SiD student's within 1.25x the teacher's (``ratio - 2 SE <=
  1.25``). A tie passes.

Standard errors: of an accuracy difference, from the binomial error counts (``accuracy_se``; the two as
independent samples, which overstates the SE of paired samples); of an FD ratio, the standard deviation of
the ratio over bootstrap replicates (``replicate_se`` of ``frechet.fd_bootstrap``'s replicates: 200 resamples
of the evaluated samples' features, rows paired across teacher and students, against the fixed real set).
Over seeds the ratio of the means over seeds is taken in every replicate (each seed resampled
independently), which combines the per-seed standard errors (for a difference of means, ``sqrt(sum SE_s^2) /
n``). Without replicates (or sample counts) a bar has ``se`` None and compares the value with the limit
alone. The SE covers the evaluation samples' noise, not the spread of training over seeds; a best-by-FD
selection (the conditional teacher's guidance, the guided student) is taken as given. Time bars are plain
comparisons.
"""
from __future__ import annotations

import math
import operator

from sidfast._checks import check_int

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


NOISE_SE = 2.0   # "by more than the noise": two standard errors
KINDS = {"below": "<", "above": ">", "not_above": "<=", "not_below": ">="}


def noise_bar(what: str, value: float, kind: str, limit: float, se: float | None, k: float = NOISE_SE) -> dict:
    """A comparative bar as a statement about an estimate ``value`` with standard error ``se``.

    kind: "below" (``value + k se < limit``), "above" (``value - k se > limit``): superiority, better than
    the limit by more than k standard errors; "not_above" (``value - k se <= limit``), "not_below" (``value
    + k se >= limit``): non-inferiority, not worse than the limit by more than k standard errors. ``se``
    None: not measured, the value alone against the limit (``<``, ``>=``, ``<=``, ``>=``, as the bars were).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    value, limit = float(value), float(limit)
    if se is not None and (not math.isfinite(float(se)) or float(se) < 0):
        raise ValueError(f"se must be a finite non-negative number or None, got {se!r}")
    margin = limit - value if kind in ("below", "not_above") else value - limit
    noise = 0.0 if se is None else k * float(se)
    if kind == "below":
        passed = margin > noise
    elif kind == "above":
        passed = margin > noise if se is not None else value >= limit
    else:
        passed = margin >= -noise
    op = ">=" if kind == "above" and se is None else KINDS[kind]
    if se is None:
        text = f"{op} {limit:.6g} (SE not measured)"
    elif kind in ("below", "above"):
        text = f"{op} {limit:.6g} by more than {k:g} SE"
    else:
        text = f"{op} {limit:.6g} within {k:g} SE"
    return {"what": what, "value": value, "bar": text, "passed": bool(passed), "margin": margin,
            "se": None if se is None else float(se), "kind": kind}


def replicate_se(replicates: dict, statistic) -> float:
    """Standard error of ``statistic(means)`` from bootstrap replicates.

    replicates: {name: [per-seed [B floats]]} (``frechet.fd_bootstrap_seeds``; every list of one length B).
    statistic: a function of {name: mean over seeds} (of the names it uses). Replicate b takes each seed's
    b-th resample (independent across seeds), the mean over seeds, and the statistic; the SE is the sample
    standard deviation of the B values.
    """
    names = list(replicates)
    if not names:
        raise ValueError("replicate_se needs replicates")
    lengths = {len(r) for per_seed in replicates.values() for r in per_seed}
    if len(lengths) != 1 or min(lengths) < 2:
        raise ValueError(f"replicates must all have one length >= 2, got {sorted(lengths)}")
    b_count = lengths.pop()
    values = []
    for b in range(b_count):
        means = {n: sum(r[b] for r in replicates[n]) / len(replicates[n]) for n in names}
        values.append(float(statistic(means)))
    if not all(math.isfinite(v) for v in values):
        raise ValueError("the statistic is not finite on some replicate")
    return summarize(values)["std"]


def _ratio_se(replicates: dict | None, num: str, den: str) -> float | None:
    if replicates is None:
        return None
    missing = [n for n in (num, den) if n not in replicates]
    if missing:
        raise ValueError(f"no bootstrap replicates for {missing}; have {', '.join(replicates)}")
    return replicate_se({num: replicates[num], den: replicates[den]}, lambda m: m[num] / m[den])


def fd_ratio_bar(fd: dict, num: str, den: str, kind: str, limit: float, replicates: dict | None) -> dict:
    """The bar on ``mean FD num / mean FD den`` (means over seeds), its SE from ``replicates``."""
    return noise_bar(f"FD {num} / FD {den}", _mean(fd, num) / _mean(fd, den), kind, limit,
                     _ratio_se(replicates, num, den))


def accuracy_se(acc_a: float, acc_b: float, samples: int) -> float:
    """Standard error of the difference of two accuracies, each from ``samples`` samples, as independent
    binomial samples: sqrt((p_a (1 - p_a) + p_b (1 - p_b)) / n)."""
    return math.sqrt((acc_a * (1 - acc_a) + acc_b * (1 - acc_b)) / samples)


def _time_bar(seconds: float, limit: float) -> dict:
    return bar("wall-clock seconds of the whole comparison", seconds, "<=", limit)


def _mean(table: dict, name: str) -> float:
    if name not in table:
        raise ValueError(f"no results for {name!r}; have {', '.join(table)}")
    return table[name]["mean"]


def sid_bars(fd: dict, replicates: dict | None = None, student_ratio: float = 1.25, init_ratio: float = 3.0,
             student: str = "student", teacher: str = "teacher", init: str = "init") -> dict:
    """The SiD demo's bars (one seed): the student's FD within ``student_ratio`` times the teacher's
    (non-inferiority: ``ratio - 2 SE <= 1.25``), and the generator at initialization above ``init_ratio``
    times the student's FD by more than the noise (``ratio - 2 SE > 3``). ``fd``: {name: summary} as
    ``summarize`` gives."""
    return {"student_vs_teacher": fd_ratio_bar(fd, student, teacher, "not_above", student_ratio, replicates),
            "init_vs_student": fd_ratio_bar(fd, init, student, "above", init_ratio, replicates)}


def sida_bars(fd: dict, seconds: float, time_limit: float, sid: str = "sid", sida: str = "sida",
              teacher: str = "teacher", replicates: dict | None = None) -> dict:
    """SiDA's headline (Zhou et al., ICLR 2025): its one-step student below the teacher's FD, and below the
    SiD student's at the same number of images, each by more than the noise: ratio of the means over seeds
    ``+ 2 SE < 1``, the SE from the FD bootstrap ``replicates``."""
    return {"sida_vs_teacher": fd_ratio_bar(fd, sida, teacher, "below", 1, replicates),
            "sida_vs_sid": fd_ratio_bar(fd, sida, sid, "below", 1, replicates),
            "time": _time_bar(seconds, time_limit)}


def best_by_fd(fd: dict, names) -> str:
    """The name among ``names`` with the lowest mean FD (the first on a tie)."""
    names = list(names)
    if not names:
        raise ValueError("best_by_fd needs at least one name")
    return min(names, key=lambda n: _mean(fd, n))


def conditional_bars(fd: dict, accuracy: dict, teachers, students, seconds: float, time_limit: float,
                     fd_ratio: float = FD_RATIO_BAR, samples: int | None = None,
                     replicates: dict | None = None) -> dict:
    """The guided student (the best of ``students`` by mean FD) against the teacher at its best guidance (the
    best of ``teachers`` by mean FD), both non-inferiority: label accuracy not below the teacher's by more
    than 2 SE of the difference (``acc_student >= acc_teacher - 2 SE``), FD within ``fd_ratio`` times the
    teacher's (``ratio - 2 SE <= fd_ratio``, SE from the FD bootstrap ``replicates``).
    ``samples``: how many samples each accuracy is measured on in all (per seed times seeds); the accuracies
    are then compared as counts, the bar names both error counts, and the SE is that of the difference of
    two independent binomial proportions (``accuracy_se``; an overstatement for the demo's samples, paired
    by latent and label). Without ``samples`` the SE is not measured."""
    teacher = best_by_fd(fd, teachers)
    student = best_by_fd(fd, students)
    acc_s, acc_t = _mean(accuracy, student), _mean(accuracy, teacher)
    precision = ""
    se = None
    if samples is not None:
        check_int("samples", samples, 1, "samples must be a positive integer, got {value!r}")
        # compared as counts of hits: means over seeds of equal counts can differ in their last bit
        hits_s, hits_t = round(acc_s * samples), round(acc_t * samples)
        acc_s, acc_t = hits_s / samples, hits_t / samples
        se = accuracy_se(acc_s, acc_t, samples)
        precision = f"; {samples - hits_s} vs {samples - hits_t} errors in {samples} samples"
    return {"accuracy_vs_teacher": noise_bar(
                f"label accuracy of {student} (not below {teacher}'s by more than 2 SE{precision})",
                acc_s, "not_below", acc_t, se),
            "fd_vs_teacher": fd_ratio_bar(fd, student, teacher, "not_above", fd_ratio, replicates),
            "time": _time_bar(seconds, time_limit)}


def steps_bars(fd: dict, one: str, many: str, seconds: float, time_limit: float,
               replicates: dict | None = None) -> dict:
    """The few-step student below the one-step student's FD by more than the noise (ratio of the means over
    seeds ``+ 2 SE < 1``, the SE from the FD bootstrap ``replicates``)."""
    return {"steps_vs_one_step": fd_ratio_bar(fd, many, one, "below", 1, replicates),
            "time": _time_bar(seconds, time_limit)}


def _pm(summary: dict | None, digits: int) -> str:
    if summary is None:
        return ""
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def _num(x) -> str:
    return "" if x is None else f"{x:.2g}" if abs(x) < 1e-3 and x != 0 else f"{x:.4g}"


def markdown(title: str, fd: dict, accuracy: dict, seconds: dict, bars: dict, teacher_fd: dict | None = None,
             best: dict | None = None) -> str:
    """The result table (one row per teacher or student: FD mean ± std, per seed; the teacher-feature
    distance, mean ± std, when ``teacher_fd`` is given; label accuracy; training seconds), the bar table, and
    the best checkpoints the students' runs kept by the teacher-feature distance (``best``: {name: [{"seed",
    "path", "teacher_fd", "iteration"}]}), in Markdown."""
    acc_cols = bool(accuracy)
    tfd_cols = bool(teacher_fd)
    head = "| | FD (mean ± std) | FD per seed |"
    head += " teacher-FD (mean ± std) |" if tfd_cols else ""
    head += " label accuracy | accuracy per seed |" if acc_cols else ""
    head += " training s (mean) |"
    lines = [f"### {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, summary in fd.items():
        row = f"| {name} | {_pm(summary, 3)} | {', '.join(f'{v:.3f}' for v in summary['per_seed'])} |"
        if tfd_cols:
            row += f" {_pm(teacher_fd.get(name), 3)} |"
        if acc_cols:
            acc = accuracy.get(name)
            # four decimals: one sample in a few thousand
            per = ", ".join(f"{v:.4f}" for v in acc["per_seed"]) if acc else ""
            row += f" {_pm(acc, 4)} | {per} |"
        train = seconds.get(name)
        row += f" {train['mean']:.1f} |" if train else " |"
        lines.append(row)
    lines += ["", "| bar | value | needs | margin | SE | |", "|---|---|---|---|---|---|"]
    for name, b in bars.items():
        lines.append(f"| {name}: {b['what']} | {b['value']:.4g} | {b['bar']} | {_num(b.get('margin'))} | "
                     f"{_num(b.get('se'))} | {'ok' if b['passed'] else 'FAILED'} |")
    if best:
        lines += ["", "best.pt kept by each student's run (teacher-FD, iteration):"]
        for name, kept in best.items():
            lines.append(f"- {name}: " + "; ".join(
                f"seed {k['seed']}: {k['path']} ({_num(k['teacher_fd'])}, {k['iteration']})" for k in kept))
    return "\n".join(lines) + "\n"
