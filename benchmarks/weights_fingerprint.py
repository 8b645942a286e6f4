"""Fingerprints of the weights that short CPU runs of `sidfast distill` train, one row per variant.

Run it on two commits (e.g. before and after a restructure) and compare the rows: equal fingerprints mean
bitwise equal generator, EMA, fake score and optimizer states.

    python benchmarks/weights_fingerprint.py [--out table.md]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

RUN = ["--device", "cpu", "--iterations", "12", "--batch", "8", "--checkpoint-every", "5", "--sample-every", "6",
       "--no-progress"]
VARIANTS = {
    "sid": ["--teacher", "teacher.pt"],
    "sid, engine fused": ["--teacher", "teacher.pt", "--engine", "fused"],
    "sida": ["--teacher", "teacher.pt", "--method", "sida", "--data", "digits.npz", "--g-start-kimg", "0.04",
             "--gan-start-kimg", "0.04"],
    "guided (lsg 1.5)": ["--teacher", "cteacher.pt", "--guidance", "lsg", "--cfg", "1.5"],
    "4-step generator": ["--teacher", "teacher.pt", "--gen-steps", "4"],
    "lora fake score, fused": ["--teacher", "teacher.pt", "--fake-score", "lora", "--lora-rank", "4",
                               "--engine", "fused"],
}
KEYS = ("generator", "generator_ema", "fake", "opt_g", "opt_fake")


def sidfast(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "sidfast.cli", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "PYTHONHASHSEED": "0"})


def fingerprint(checkpoint: Path) -> str:
    data = torch.load(checkpoint, map_location="cpu", weights_only=False)
    h = hashlib.sha256()

    def walk(obj, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            h.update(path.encode())
            h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(obj[k], f"{path}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}/{i}")

    walk({k: data[k] for k in KEYS}, "")
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sidfast-fingerprint-") as tmp:
        work = Path(tmp)
        sidfast("train-teacher", "--out", "teacher.pt", "--iterations", "200", "--device", "cpu", cwd=work)
        sidfast("train-teacher", "--out", "cteacher.pt", "--iterations", "200", "--conditional", "--device", "cpu",
                cwd=work)
        from sklearn.datasets import load_digits

        digits = load_digits()
        np.savez(work / "digits.npz", images=(digits.images / 16 * 2 - 1).astype("float32")[:, None],
                 labels=digits.target)
        rows = ["| run | fingerprint |", "|---|---|"]
        for i, (name, variant) in enumerate(VARIANTS.items()):
            sidfast("distill", *variant, "--run-dir", f"run{i}", *RUN, cwd=work)
            rows.append(f"| {name} | `{fingerprint(work / f'run{i}' / 'checkpoint.pt')}` |")
    table = "\n".join(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
