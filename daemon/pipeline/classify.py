"""Classifier pre- and post-processing, pure numpy: normalization, decisions, age statistics."""

from __future__ import annotations

import numpy as np

MALE, FEMALE, UNCERTAIN = "male", "female", "uncertain"

# age-v1's 81 bins: ages 0..80, the first standing for 0.25 years.
AGE_BINS = np.concatenate([[0.25], np.arange(1, 81)]).astype(np.float64)


def normalize(chips_bgr: np.ndarray, means_rgb: tuple[float, float, float] | None, scale: float) -> np.ndarray:
    """(N, S, S, 3) uint8 BGR chips -> (N, 3, S, S) float32 RGB, ``(byte - mean) * scale``."""
    rgb = chips_bgr[..., ::-1].astype(np.float32)
    if means_rgb is not None:
        rgb -= np.asarray(means_rgb, np.float32)
    rgb *= np.float32(scale)
    return np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))


def decide(p_male: np.ndarray, threshold: float = 0.5, margin: float = 0.1) -> list[str]:
    """Gender labels from p(male): ``male`` when p >= threshold + margin, ``female`` when
    p <= threshold - margin, ``uncertain`` in between (the band is open at both ends only
    when margin > 0; with margin 0 every face gets a label, p == threshold counting as male)."""
    labels = []
    for p in np.asarray(p_male, np.float64):
        if margin <= 0:
            labels.append(MALE if p >= threshold else FEMALE)
        elif p >= threshold + margin:
            labels.append(MALE)
        elif p <= threshold - margin:
            labels.append(FEMALE)
        else:
            labels.append(UNCERTAIN)
    return labels


def age_statistics(probs: np.ndarray, bins: np.ndarray = AGE_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Expected age and its standard deviation from (N, K) probabilities over ``bins``."""
    p = probs / probs.sum(axis=1, keepdims=True)
    mean = p @ bins
    var = p @ (bins**2) - mean**2
    return mean, np.sqrt(np.clip(var, 0, None))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
