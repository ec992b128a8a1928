"""CT-like noise: uniform-difference noise followed by an in-plane Gaussian blur, by slabs in threads.

Each slab has its own random stream spawned from the phantom's noise seed and its own scratch buffers, so the
result is the same whatever the thread scheduling. The image is rounded and clipped to the int16 CT range.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from flareseg.data.phantom.grid import slab_size, threads

_HU_MIN, _HU_MAX = -1024, 3071
BLUR_SIGMA = 0.7  # voxels, in-plane: the reference generator's (a standard reconstruction kernel)


def add_noise_and_blur(
    image: np.ndarray, noise_seed: np.random.SeedSequence, noise_std: float, blur_sigma: float = BLUR_SIGMA
) -> None:
    """Noise then an in-plane Gaussian blur (so the noise is correlated like reconstructed CT noise), by slabs.

    The noise is the difference of two uniform variables (several times faster to draw than normal ones);
    blurred over about 6 effective voxels it is Gaussian for all practical purposes. It is scaled so that its
    standard deviation after the blur is `noise_std`. Slabs are small (cache-sized) and run in threads, each
    with its own scratch buffers and its own random stream, so the result does not depend on the scheduling.
    The blur (`blur_sigma` voxels) stands for the reconstruction kernel: a small sigma gives fine-grained noise
    (a sharp kernel; averaged over fewer voxels, its distribution is less Gaussian), a large one coarse, blotchy
    noise (a soft kernel).
    """
    radius = max(1, round(3 * blur_sigma))  # 2 for the reference sigma: the taps at +-3 would weigh 1e-4
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / blur_sigma) ** 2)
    kernel /= kernel.sum()
    uniform_pair_std = math.sqrt(2 / 12)
    scale = np.float32(noise_std / float((kernel**2).sum()) / uniform_pair_std)  # 2D separable: gain sum(k^2)
    slab = slab_size(image.shape)
    starts = range(0, image.shape[0], slab)
    seeds = noise_seed.spawn(len(starts))
    scratch = threading.local()

    def process(job: tuple[int, np.random.SeedSequence]) -> None:
        z0, seed = job
        z1 = min(z0 + slab, image.shape[0])
        shape = (z1 - z0, *image.shape[1:])
        if getattr(scratch, "shape", None) != shape:
            scratch.shape, scratch.buffers = shape, [np.empty(shape, dtype=np.float32) for _ in range(3)]
        block, noise, tmp = scratch.buffers
        np.copyto(block, image[z0:z1])
        rng = np.random.default_rng(seed)
        rng.random(dtype=np.float32, out=noise)
        rng.random(dtype=np.float32, out=tmp)
        noise -= tmp
        noise *= scale
        block += noise
        _blur(block, noise, tmp, axis=1, kernel=kernel)
        _blur(noise, block, tmp, axis=2, kernel=kernel)
        np.rint(block, out=block)
        np.clip(block, _HU_MIN, _HU_MAX, out=block)
        image[z0:z1] = block

    with ThreadPoolExecutor(threads()) as pool:
        list(pool.map(process, zip(starts, seeds, strict=True)))


def _blur(src: np.ndarray, dst: np.ndarray, tmp: np.ndarray, axis: int, kernel: np.ndarray) -> None:
    """dst = src correlated with a short symmetric kernel along `axis`, edge voxels extended; tmp is scratch."""

    def part(start: int, stop: int) -> tuple[slice, ...]:
        index = [slice(None)] * src.ndim
        index[axis] = slice(start, stop)
        return tuple(index)

    n, radius = src.shape[axis], len(kernel) // 2
    np.multiply(src, np.float32(kernel[radius]), out=dst)
    for shift in range(1, radius + 1):
        weight = np.float32(kernel[radius + shift])  # symmetric: the same weight on both sides
        if n - shift > shift:  # the interior: both neighbours exist
            pair = tmp[part(shift, n - shift)]
            np.add(src[part(0, n - 2 * shift)], src[part(2 * shift, n)], out=pair)
            pair *= weight
            dst[part(shift, n - shift)] += pair
        for i in sorted(set(range(min(shift, n))) | set(range(max(n - shift, 0), n))):  # edges: clamp
            left, right = max(i - shift, 0), min(i + shift, n - 1)
            dst[part(i, i + 1)] += weight * (src[part(left, left + 1)] + src[part(right, right + 1)])
