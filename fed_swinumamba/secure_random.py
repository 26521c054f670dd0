"""Randomness for DP-SGD that only the site can predict: a ChaCha20 keystream keyed from OS entropy.

DP-SGD's guarantee rests on the coordinator not knowing the noise it adds nor which patients a step
sampled. PyTorch's and NumPy's generators are not cryptographic (their state follows from a few
outputs or from the seed), and Opacus's secure mode needs torchcsprng, which is not available for
this PyTorch. So the noise and the Poisson sampling draw their bits from ChaCha20 (the
``cryptography`` package, i.e. OpenSSL) under a 256-bit key: from ``os.urandom`` in every private
run, or derived from the run's seed when a test or benchmark asks for reproducible, not private, DP.

Every draw uses its own nonce (purpose, draw number), so no keystream is ever reused and a draw's
length is not bounded by ChaCha20's 32-bit block counter.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
_NOISE, _SAMPLING, _SEEDS = 1, 2, 3  # purposes: each has its own nonces
_UNIT = 2.0**-53  # a 53-bit integer times this is a double in [0, 1)


def secure_key() -> bytes:
    """A fresh key from the operating system's entropy: what every private run uses."""
    return os.urandom(KEY_BYTES)


def reproducible_key(seed: int) -> bytes:
    """A key anyone who knows ``seed`` can compute: reproducible DP runs for tests, NOT private."""
    return hashlib.sha256(f"fed-swinumamba reproducible DP, seed {seed}".encode()).digest()


class KeyStream:
    """Uniform bits, uniforms, Gaussians and Poisson samples from ChaCha20 under one key."""

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError(f"a ChaCha20 key has {KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self._draws = 0

    def _words(self, purpose: int, count: int) -> np.ndarray:
        """``count`` uniform 64-bit words of a keystream used for nothing else."""
        self._draws += 1
        nonce = (
            bytes(4) + purpose.to_bytes(4, "little") + self._draws.to_bytes(8, "little")
        )  # 32-bit counter first (RFC 7539)
        encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        return np.frombuffer(encryptor.update(bytes(8 * count)), dtype=np.uint64)

    @staticmethod
    def _unit(words: np.ndarray) -> torch.Tensor:
        """64-bit words -> doubles in [0, 1) with 53 random bits each."""
        return torch.from_numpy((words >> np.uint64(11)).view(np.int64)).to(torch.float64).mul_(_UNIT)

    def normal(
        self, shape: torch.Size | tuple[int, ...], std: float, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Gaussian noise N(0, std^2) of ``shape`` (float32, on ``device``), by the Box-Muller transform.

        A pair of draws takes a 53-bit uniform for its radius (computed in float64: the largest draw is
        about 8.6 std) and a 24-bit one for its angle (float32). The keystream is made on the CPU, the
        arithmetic runs where the noise is needed.
        """
        count = math.prod(shape)
        pairs = (count + 1) // 2
        words = self._words(_NOISE, pairs + (pairs + 1) // 2)
        radius = (
            torch.log1p(self._unit(words[:pairs]).to(device).neg_()).mul_(-2.0 * std * std).sqrt_().to(torch.float32)
        )
        turns = torch.from_numpy((words[pairs:].view(np.uint32)[:pairs] >> np.uint32(8)).view(np.int32)).to(device)
        angle = turns.to(torch.float32).mul_(2.0 * math.pi / 2**24)
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count].view(shape)

    def poisson_sample(self, num_samples: int, sample_rate: float) -> list[int]:
        """Indices of a Poisson batch: each of ``num_samples`` is in it with probability ``sample_rate``
        (what Opacus's ``UniformWithReplacementSampler`` draws, from this keystream)."""
        return torch.nonzero(self._unit(self._words(_SAMPLING, num_samples)) < sample_rate).flatten().tolist()

    def seed(self) -> int:
        """A 32-bit seed for the generators whose draws need not be secret (augmentation, slice choice)."""
        return int(self._words(_SEEDS, 1)[0] >> np.uint64(32))
