"""Print the options of ``sidfast distill`` as a markdown table, from ``sidfast.training.config.TrainConfig``.

    python docs/options.py          # the main options (the table in README.md)
    python docs/options.py --all    # every option

The table is generated so that the README cannot drift from the defaults and help strings in code.
"""
from __future__ import annotations

import sys

from sidfast.training.config import TrainConfig

MAIN = ("run_dir", "recipe", "preset", "iterations", "batch", "batch_gpu", "lr", "lr_cooldown", "alpha", "t_init",
        "fake_levels", "gen_levels", "loss_scale_g", "ema_halflife_kimg", "ema_rampup_ratio", "gen_steps",
        "guidance", "cfg", "precision", "device", "engine", "fake_score", "lora_rank", "compile", "checkpoint_every",
        "sample_every", "seed")


def _default(value, help_: str = "") -> str:
    if (value is None or value == "auto") and "the recipe's" in help_:
        return "recipe"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    if isinstance(value, int) and value >= 10_000:
        return f"{value:_}"
    return str(value)


def table(names=None) -> str:
    """The markdown table of ``names`` (all options when None), in ``TrainConfig``'s field order."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in TrainConfig.fields():
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{flag}` | `{_default(f.default, help_)}` | {help_} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(None if "--all" in sys.argv[1:] else MAIN))
