"""The digit classifier whose penultimate layer is the feature space of the demo's Frechet distance.

A small CNN trained with cross-entropy on 80% of the digits (a few seconds on a CPU), cached on disk
keyed by a version hash of its recipe; a missing, corrupt or foreign cache file is retrained and
rewritten atomically. ``features(x)`` maps images (B, 1, 8, 8) in [-1, 1] to (B, FEATURE_DIM).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from sidfast.demo.digits import load_digits_tensors, split
from sidfast.utils.files import atomic_save

# Bump when the architecture or the training recipe changes: the cache key changes with it.
RECIPE = {"version": 1, "channels": (32, 64), "feature_dim": 64, "epochs": 30, "batch": 64, "lr": 2e-3,
          "weight_decay": 1e-4, "seed": 0, "held_out": 0.2, "shift_augment": 1}
FEATURE_DIM = RECIPE["feature_dim"]


def recipe_hash(recipe: dict = RECIPE) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """$SIDFAST_CACHE, else $XDG_CACHE_HOME/sidfast, else ~/.cache/sidfast."""
    if os.environ.get("SIDFAST_CACHE"):
        return Path(os.environ["SIDFAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sidfast"


class DigitClassifier(nn.Module):
    """conv3x3-ReLU x2 (8x8) -> maxpool (4x4) -> conv3x3-ReLU -> flatten -> fc-ReLU (features) -> fc (10
    logits)."""

    def __init__(self, channels=RECIPE["channels"], feature_dim: int = FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(c2 * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim) of images (B, 1, 8, 8) in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int) -> torch.Tensor:
    """Shift each image by up to max_shift pixels, padding with the background value -1."""
    if max_shift == 0:
        return x
    b = x.shape[0]
    padded = nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(8)[None, :])  # (B, 8)
    cols = (dx[:, None] + torch.arange(8)[None, :])
    idx_b = torch.arange(b)[:, None, None]
    return padded[idx_b, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def train_classifier(recipe: dict = RECIPE, log=None) -> tuple[DigitClassifier, float]:
    """Train on the fixed 80% split, return (model in eval mode on CPU, held-out accuracy)."""
    g = torch.Generator().manual_seed(recipe["seed"])
    torch.manual_seed(recipe["seed"])
    images, labels = load_digits_tensors()
    (tx, ty), (vx, vy) = split(images, labels, recipe["held_out"], recipe["seed"])
    model = DigitClassifier(recipe["channels"], recipe["feature_dim"])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps_per_epoch = (tx.shape[0] + recipe["batch"] - 1) // recipe["batch"]
    total_steps = recipe["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe["lr"], total_steps=total_steps)
    model.train()
    for _ in range(recipe["epochs"]):
        perm = torch.randperm(tx.shape[0], generator=g)
        for i in range(0, tx.shape[0], recipe["batch"]):
            idx = perm[i:i + recipe["batch"]]
            x = _random_shift(tx[idx], g, recipe["shift_augment"])
            loss = nn.functional.cross_entropy(model(x), ty[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    accuracy = evaluate_accuracy(model, vx, vy)
    if log:
        log(f"digit classifier trained: held-out accuracy {accuracy:.3f}")
    return model, accuracy


@torch.no_grad()
def evaluate_accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def _cache_path(cache_dir: Path, recipe: dict) -> Path:
    return Path(cache_dir) / f"digit_classifier_{recipe_hash(recipe)}.pt"


def _load_cached(path: Path, recipe: dict) -> tuple[DigitClassifier, float] | None:
    """The cached classifier, or None when the file is missing, unreadable, foreign or of another recipe."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("recipe_hash") != recipe_hash(recipe):
            return None
        model = DigitClassifier(recipe["channels"], recipe["feature_dim"])
        model.load_state_dict(blob["state_dict"])
        accuracy = float(blob["accuracy"])
    except Exception:  # corrupt or foreign file: retrain
        return None
    model.eval()
    return model, accuracy


def load_or_train_classifier(cache_dir=None, recipe: dict = RECIPE,
                             log=None) -> tuple[DigitClassifier, float, bool]:
    """(classifier in eval mode on CPU, held-out accuracy, whether it came from the cache).

    The cache file ``digit_classifier_<recipe hash>.pt`` lives in ``cache_dir`` (default
    ``default_cache_dir()``).
    A corrupt or mismatching file is replaced; an unwritable cache directory only costs a warning. ``log``
    gets those two notices only: the caller says which classifier it got, and its accuracy.
    """
    path = _cache_path(Path(cache_dir) if cache_dir is not None else default_cache_dir(), recipe)
    cached = _load_cached(path, recipe)
    if cached is not None:
        return (*cached, True)
    if path.exists() and log:
        log(f"classifier cache {path} is unreadable or stale: retraining")
    model, accuracy = train_classifier(recipe)  # the caller reports the accuracy (once)
    try:
        atomic_save({"recipe_hash": recipe_hash(recipe), "recipe": recipe, "accuracy": accuracy,
                     "state_dict": model.state_dict()}, path, keep_previous=False)
    except OSError as exc:
        if log:
            log(f"could not write the classifier cache {path}: {exc}")
    return model, accuracy, False


@torch.no_grad()
def extract_features(model: DigitClassifier, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Features (N, FEATURE_DIM) float32 on CPU of images (N, 1, 8, 8) on any device; values clipped to
    [-1, 1]."""
    out = []
    for i in range(0, images.shape[0], batch):
        out.append(model.features(images[i:i + batch].detach().float().cpu().clamp(-1, 1)))
    return torch.cat(out)


@torch.no_grad()
def label_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor,
                   batch: int = 1024) -> float:
    """Fraction of images (N, 1, 8, 8) on any device, values clipped to [-1, 1], that the classifier assigns
    to the requested class ``labels`` (N,) ints: how well a conditional generator honours its labels."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) must have one row each")
    hits = 0
    for i in range(0, images.shape[0], batch):
        x = images[i:i + batch].detach().float().cpu().clamp(-1, 1)
        hits += int((model(x).argmax(1) == labels[i:i + batch].cpu()).sum())
    return hits / images.shape[0]
