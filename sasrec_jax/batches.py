"""Training batches on the host (numpy): shuffled rows of the training windows, padded to the global batch, cut
into one block of rows per device, with each device's real target positions gathered for the loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sasrec_serve.ids import PAD

POSITION_BUCKETS = 16  # gathered-position counts are rounded up to B·L/16: few shapes, few recompiles


@dataclass(frozen=True)
class Batch:
    """One step's host arrays for this process: its rows of the global batch, their next-item targets, and for
    each of its devices the flat indices of that device's real target positions (bucket padding points at
    position 0 with weight 0). Each device gathers its own positions, so nothing is replicated."""

    inputs_BxL: np.ndarray  # this process's rows (all of them on one process)
    targets_BxL: np.ndarray
    idx_SxN: np.ndarray  # int32, one row per local device, into that device's flattened rows·L positions
    weight_SxN: np.ndarray  # float32, 0 on bucket padding
    num_sequences: int  # real (not padding) rows of the global batch


def make_batch(
    inputs_BxL: np.ndarray, targets_BxL: np.ndarray, batch_size: int, num_shards: int = 1, local=None
) -> Batch:
    """Pads a global batch to `batch_size` rows, cuts it into `num_shards` equal blocks of rows (one per device,
    in mesh order) and keeps the blocks of `local` (this process's devices; all by default). The number of
    gathered positions per device is the same for every device (the largest count, rounded up to a bucket of
    rows·L/16): every process derives it from the whole global batch, so the shapes agree without talking."""
    n = len(inputs_BxL)
    if n < batch_size:  # the epoch's last batch: zero rows have no targets, so they add no loss
        pad = ((0, batch_size - n), (0, 0))
        inputs_BxL, targets_BxL = np.pad(inputs_BxL, pad), np.pad(targets_BxL, pad)
    local = range(num_shards) if local is None else local
    rows = batch_size // num_shards
    real_SxR = (targets_BxL != PAD).reshape(num_shards, -1)
    quantum = max(1, real_SxR.shape[1] // POSITION_BUCKETS)
    size = max(quantum, math.ceil(int(real_SxR.sum(axis=1).max()) / quantum) * quantum)
    idx = np.zeros((len(local), size), np.int32)
    weight = np.zeros((len(local), size), np.float32)
    for i, shard in enumerate(local):
        flat = np.flatnonzero(real_SxR[shard])
        idx[i, : len(flat)] = flat
        weight[i, : len(flat)] = 1.0
    mine = slice(local.start * rows, local.stop * rows)
    return Batch(inputs_BxL[mine], targets_BxL[mine], idx, weight, n)


@dataclass(frozen=True)
class Batcher:
    """Shuffled batches of training rows; every process draws the same global batches and feeds its own rows."""

    inputs: np.ndarray
    targets: np.ndarray
    batch_size: int  # the global batch
    num_shards: int = 1  # devices in the mesh
    local: range = range(1)  # this process's devices, as positions in the mesh

    @classmethod
    def create(cls, inputs: np.ndarray, targets: np.ndarray, batch_size: int, placement=None) -> Batcher:
        shards = (placement.num_devices, placement.local_shards) if placement is not None else (1, range(1))
        return cls(inputs, targets, batch_size, *shards)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.inputs) / self.batch_size)

    def batches(self, seed: int, epoch: int, skip: int = 0):
        """This process's part of the epoch's batches after the first `skip`; their order depends only on
        (seed, epoch), which is what makes resume exact (also from inside an epoch) and every process agree."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.inputs))
        for lo in range(skip * self.batch_size, len(order), self.batch_size):
            rows = order[lo : lo + self.batch_size]
            yield make_batch(self.inputs[rows], self.targets[rows], self.batch_size, self.num_shards, self.local)
