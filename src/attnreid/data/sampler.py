"""PK identity sampling: batches of P identities x K images (MHSA-Net Sec. VII-B: 32 x 4).

Batch-hard triplet losses (and IHTL, Eq. 5) need every anchor to have positives in the
batch, hence identity-balanced batches.

Two meanings of an epoch (``data.epoch_mode``):

- ``images``: every training image once (up to the K-group remainders), as torchreid's
  RandomIdentitySampler does: about (number of images) / (P x K) batches.
- ``identities``: every training identity once, with K images each, as the MHSA-Net
  authors' sampler did; Market-1501 (751 identities, P = 32) gives 751 // 32 = 23 batches,
  so the paper's 400 epochs are about 9.2k steps.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

from attnreid.choices import EPOCH_MODES
from attnreid.errors import DataError


class PKSampler(Sampler[List[int]]):
    """A batch sampler yielding lists of ``batch_size = P x K`` dataset indices.

    Per epoch: each identity's images are shuffled and cut into groups of K (an identity
    with fewer than K images is sampled with replacement up to K; a remainder shorter
    than K is dropped, as torchreid's RandomIdentitySampler does); then batches are formed
    by repeatedly drawing P identities that still have a group, without replacement
    inside a batch, until fewer than P such identities remain.

    With ``epoch_mode="identities"`` an epoch is instead one pass over the identities: they
    are shuffled and cut into batches of P (the last ``num_ids % P`` are left for a later
    epoch), and each contributes K of its images drawn without replacement (with
    replacement when it has fewer than K).

    Deterministic for ``(seed, epoch)``; call :meth:`set_epoch` before each epoch. With
    ``world_size > 1`` (DDP; ``batch_size`` is per process) every rank builds the same
    global batches of ``P x world_size`` identities, drawn together as above, and takes
    the ``rank``-th run of P of them: the ranks of a step never share an identity, all
    run the same number of steps, and their batches put together are the batches of one
    process with ``batch_size x world_size``. Use it as
    ``DataLoader(..., batch_sampler=PKSampler(...))``.
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, epoch_mode: str = "images"):
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise DataError(
                f"PK sampling needs data.batch_size ({batch_size}) to be a positive multiple of "
                f"data.num_instances ({num_instances})"
            )
        if not 0 <= rank < world_size:
            raise DataError(f"PK sampler rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        if epoch_mode not in EPOCH_MODES:
            raise DataError(f"data.epoch_mode is {epoch_mode!r}; expected images or identities")
        self.epoch_mode = epoch_mode
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_pids_per_batch = batch_size // num_instances
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_pids_per_batch = self.num_pids_per_batch * world_size
        self.epoch = 0
        index: Dict[int, List[int]] = {}
        for i, pid in enumerate(pids):
            index.setdefault(int(pid), []).append(i)
        self.index = {pid: np.asarray(idx) for pid, idx in sorted(index.items())}
        if len(self.index) < self.global_pids_per_batch:
            procs = f" x {world_size} processes" if world_size > 1 else ""
            raise DataError(
                f"PK sampling needs at least P = data.batch_size / data.num_instances = {self.num_pids_per_batch}"
                f"{procs} identities, the training set has {len(self.index)}; lower data.batch_size"
            )
        self._cache: Optional[tuple] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _global_batches(self) -> List[List[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        k = self.num_instances
        if self.epoch_mode == "identities":
            batches = self._identity_batches(rng)
            self._cache = (self.epoch, batches)
            return batches
        groups: Dict[int, List[np.ndarray]] = {}
        for pid, idx in self.index.items():
            chosen = rng.choice(idx, size=k, replace=True) if len(idx) < k else rng.permutation(idx)
            groups[pid] = [chosen[i:i + k] for i in range(0, len(chosen) - k + 1, k)]
        available = [pid for pid in self.index if groups[pid]]
        batches: List[List[int]] = []
        while len(available) >= self.global_pids_per_batch:
            picked = rng.choice(len(available), size=self.global_pids_per_batch, replace=False)
            batch: List[int] = []
            for j in picked:
                batch.extend(int(i) for i in groups[available[j]].pop())
            batches.append(batch)
            available = [pid for pid in available if groups[pid]]
        self._cache = (self.epoch, batches)
        return batches

    def _identity_batches(self, rng: np.random.Generator) -> List[List[int]]:
        k, p = self.num_instances, self.global_pids_per_batch
        pids = list(self.index)
        order = rng.permutation(len(pids))
        batches: List[List[int]] = []
        for start in range(0, len(order) - p + 1, p):
            batch: List[int] = []
            for j in order[start:start + p]:
                idx = self.index[pids[j]]
                batch.extend(int(i) for i in rng.choice(idx, size=k, replace=len(idx) < k))
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[List[int]]:
        yield from self._local_batches()

    def _local_batches(self) -> List[List[int]]:
        # A global batch is P x world_size runs of K images, one run per identity.
        start = self.rank * self.batch_size
        return [b[start:start + self.batch_size] for b in self._global_batches()]

    def __len__(self) -> int:
        return len(self._local_batches())
