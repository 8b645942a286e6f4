"""All metrics of a set of generated features against a reference: FID from the two sets' statistics, and KID
and precision/recall from the features themselves when the reference keeps features (EDM's references hold
only mu and sigma: those two are then left out, and the result says why)."""
from __future__ import annotations

from sidfast.evaluate import kernel, manifold
from sidfast.evaluate.frechet import frechet_distance
from sidfast.evaluate.statistics import FeatureStats


def compare(gen: FeatureStats, ref: FeatureStats, kid_subsets: int = kernel.SUBSETS,
            kid_subset_size: int = kernel.SUBSET_SIZE, pr_k: int = manifold.NEIGHBOURS, device="cpu") -> dict:
    """``{"fid", and "kid", "kid_std", "kid_subset_size", "kid_subsets", "precision", "recall", "pr_k" when
    both sides have features, else "skipped": why}``. ``gen.features`` must be all the generated features."""
    if gen.dim != ref.dim:
        raise ValueError(f"generated features have {gen.dim} dimensions, the reference {ref.dim}")
    out = {"fid": frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)}
    if ref.features is None or gen.features is None:
        out["skipped"] = ("kid and precision/recall: the reference holds only mu and sigma (EDM's format); "
                          "sidfast eval --make-ref writes one with features")
        return out
    out.update(kernel.kernel_distance(gen.features, ref.features, kid_subsets, kid_subset_size, device=device))
    out.update(manifold.precision_recall(gen.features, ref.features, pr_k, device=device))
    return out


__all__ = ["compare"]
