"""A perceptual hash of a decoded image for finding near-copies, in pure numpy (no file is read
or decoded here).

The hash has 192 bits, three 64-bit words, compared by the number of differing bits:

1. **pHash** (as ``imagehash.phash`` computes it): the luma averaged onto a 32 x 32 grid, its
   2-D DCT-II, and of the 8 x 8 lowest frequencies one bit per coefficient: above their median;
2. **dHash of the rows**: the luma averaged onto 8 rows x 9 columns; a bit per pair of
   neighbours in a row: the right one brighter;
3. **dHash of the columns**: the same on 9 rows x 8 columns, downwards.

pHash alone cannot tell a 5 %-cropped copy from a different portrait of the same framing (the
LFW faces); the three together can (``benchmarks/near_bench.py``: recall and precision per
distance). Every grid is an area average of the luma over boxes of the upright image (one pass
over the pixels onto a 288 x 288 grid that the three grids divide), so the decoder's JPEG size
reduction changes the hash by a few bits at most.

Within a word, bit 0 is the most significant; the text form is the three words as 48 lowercase
hexadecimal digits, pHash first.
"""

from __future__ import annotations

import re

import numpy as np

WORDS = 3
BITS = 64 * WORDS
_FINE = 288  # divisible by 32, 8 and 9
_LOW = 8

# ITU-R BT.601 luma weights (as Pillow's "L" conversion), in BGR order
_LUMA_BGR = np.array([0.114, 0.587, 0.299])


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``m @ x`` is the DCT of the column vector ``x``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return np.asarray(m, np.float64)


_DCT = _dct_matrix(32)[:_LOW]  # only the rows of the kept frequencies
_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)
_HEX = re.compile(r"[0-9a-f]{48}")


def _edges(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Start index and pixel count of each of ``size`` boxes along an axis of ``n`` pixels (a box
    of no pixels, when ``n < size``, takes the one pixel it starts at)."""
    edges = (np.arange(size + 1) * n) // size
    return edges[:size], np.maximum(np.diff(edges), 1)


def grid(image: np.ndarray, size: int = _FINE) -> np.ndarray:
    """The (size, size) float64 luma of an (H, W) gray or (H, W, 3) BGR uint8 image, averaged
    over a size x size grid of boxes (from every ``step``-th row and column of an image at
    least ``2 * step * size`` pixels on its shorter side: the cost stays near that of a 600 x 600
    image whatever the size)."""
    if image.ndim not in (2, 3) or image.shape[0] < 1 or image.shape[1] < 1 or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"near hash: the image must be (H, W) gray or (H, W, 3) BGR with H, W >= 1, got shape {image.shape}")
    step = max(1, min(image.shape[0], image.shape[1]) // (2 * size))
    if step > 1:  # at least two pixels of each box's every row and column remain: a fair average
        image = image[::step, ::step]
    rows, nrows = _edges(image.shape[0], size)
    cols, ncols = _edges(image.shape[1], size)
    # a box holds at most (H / size + 1) * (W / size + 1) pixels: far from overflowing uint32
    sums = np.add.reduceat(np.add.reduceat(image, rows, axis=0, dtype=np.uint32), cols, axis=1).astype(np.float64)
    if sums.ndim == 3:
        sums = sums @ _LUMA_BGR
    return np.asarray(sums / (nrows[:, None] * ncols[None, :]), np.float64)


def _rebin(g: np.ndarray, rows: int, cols: int) -> np.ndarray:
    n = g.shape[0]
    return np.asarray(g.reshape(rows, n // rows, cols, n // cols).mean(axis=(1, 3)), np.float64)


def _word(bits: np.ndarray) -> int:
    return int(np.sum(_WEIGHTS[bits.ravel()], dtype=np.uint64))


def words(image: np.ndarray) -> tuple[int, int, int]:
    """The three 64-bit words (unsigned ints) of an upright BGR or gray uint8 image."""
    g = grid(image)
    low = _DCT @ _rebin(g, 32, 32) @ _DCT.T
    across = _rebin(g, 8, 9)
    down = _rebin(g, 9, 8)
    return _word(low > np.median(low)), _word(across[:, 1:] > across[:, :-1]), _word(down[1:, :] > down[:-1, :])


def near_hash(image: np.ndarray) -> str:
    """The hash of an upright (H, W, 3) BGR or (H, W) gray uint8 image: 48 hexadecimal digits."""
    return "".join(f"{w:016x}" for w in words(image))


def parse(text: str) -> np.ndarray:
    """A hash's text form as a (3,) uint64 array; ValueError when it is not 48 hex digits."""
    if not isinstance(text, str) or not _HEX.fullmatch(text):
        raise ValueError(f"near hash: must be 48 lowercase hexadecimal digits, got {text!r}")
    return np.frombuffer(bytes.fromhex(text), ">u8").astype(np.uint64)


def parse_many(texts: list[str]) -> np.ndarray:
    """Many hashes' text forms as an (N, 3) uint64 array; ValueError when one is not 48 hex digits."""
    if not texts:
        return np.zeros((0, WORDS), np.uint64)
    try:
        if set(map(len, texts)) != {48}:
            raise ValueError("a hash of another length")
        raw = bytes.fromhex("".join(texts))
    except (TypeError, ValueError) as err:
        bad = next((t for t in texts if not isinstance(t, str) or not _HEX.fullmatch(t.lower())), None)
        raise ValueError(f"near hash: must be 48 hexadecimal digits, got {bad!r}") from err
    return np.frombuffer(raw, ">u8").astype(np.uint64).reshape(len(texts), WORDS)


def distances(hashes: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Differing bits (int64, 0 to 192) between each row of ``hashes`` ((N, 3) uint64) and ``h`` ((3,))."""
    return np.asarray(np.bitwise_count(np.bitwise_xor(hashes, h)).sum(axis=-1, dtype=np.int64), np.int64)
