"""Torch datasets and loaders for training (PK batches) and testing (in order).

A bad image met while loading (unreadable, empty, corrupt) must reach the user as one
line naming the file, even when it happens inside a DataLoader worker process, where a
raised exception would come back wrapped in the worker's traceback. So the loaders built
here catch the :class:`DataError` in the worker, pass a marker through the collate
function, and raise (or, with ``skip_bad_images``, report on stderr and drop the image)
in the main process.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from attnreid.choices import check_workers
from attnreid.data.datasets.base import Item, ReIDDataset, relabel
from attnreid.data.io import read_image
from attnreid.data.sampler import PKSampler
from attnreid.data.transforms import build_transforms
from attnreid.errors import DataError
from attnreid.progress import ProgressReporter


class BadImage:
    """Stands in for an image that could not be read (carried from a worker to the main process)."""

    def __init__(self, path: str, message: str):
        self.path, self.message = path, message


class ImageDataset(Dataset):
    """``items[i] -> (image tensor, pid, camid, i)``.

    ``mark_bad=False`` (direct use): a bad image raises :class:`DataError`. The loaders
    below set ``mark_bad=True`` so that it becomes a :class:`BadImage` handled in the main
    process.
    """

    def __init__(self, items: Sequence[Item], transform: Callable, mark_bad: bool = False):
        self.items = list(items)
        self.transform = transform
        self.mark_bad = mark_bad

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Union[Tuple[torch.Tensor, int, int, int], BadImage]:
        path, pid, camid = self.items[index]
        try:
            image = read_image(path)
        except DataError as exc:
            if not self.mark_bad:
                raise
            return BadImage(path, str(exc))
        return self.transform(image), pid, camid, index


class _Checked:
    """A collated batch (or None) plus the bad images found while building it."""

    def __init__(self, batch: Any, bad: List[BadImage]):
        self.batch, self.bad = batch, bad




def resolve_workers(value: Union[int, str], cpus: Optional[int] = None) -> int:
    """``data.workers`` as a number of DataLoader processes.

    ``auto`` = min(4, CPUs - 1): one CPU is left to the training process itself, four
    workers keep a GPU fed at re-ID image sizes, and a one-CPU machine loads in the main
    process (0). CPUs are those this process may run on (``sched_getaffinity``).
    """
    if check_workers(value) == "auto":
        if cpus is None:
            try:
                cpus = len(os.sched_getaffinity(0))
            except AttributeError:  # not on Linux
                cpus = os.cpu_count() or 1
        return max(0, min(4, cpus - 1))
    return value



def collate_marking_bad(samples: List[Any]) -> Any:
    bad = [s for s in samples if isinstance(s, BadImage)]
    if not bad:
        return default_collate(samples)
    good = [s for s in samples if not isinstance(s, BadImage)]
    return _Checked(default_collate(good) if good else None, bad)


class ReIDDataLoader(DataLoader):
    """A DataLoader that turns bad images into one-line errors or, if ``skip_bad_images``, skips them.

    Skipped files are printed on stderr once and collected in ``bad_images``.
    """

    def __init__(self, *args: Any, skip_bad_images: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skip_bad_images = skip_bad_images
        self.bad_images: List[str] = []

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            if isinstance(batch, _Checked):
                for item in batch.bad:
                    if not self.skip_bad_images:
                        raise DataError(item.message)
                    if item.path not in self.bad_images:
                        self.bad_images.append(item.path)
                        print(f"skipped: {item.message}", file=sys.stderr)
                if batch.batch is None:
                    continue
                batch = batch.batch
            yield batch


def ignore_sigint(_worker_id: int) -> None:
    """``worker_init_fn``: Ctrl-C is the main process's to handle (it stops the workers).

    A terminal sends SIGINT to every process of the group. A worker that takes it exits
    (quietly), and when the main process notices the dead worker before its own
    KeyboardInterrupt arrives it raises ``RuntimeError: DataLoader worker ... exited
    unexpectedly`` instead, which no Ctrl-C handler catches (a traceback and exit status 1
    during the final evaluation). Workers that ignore SIGINT stay alive until the
    main process shuts them down.

    A worker also hands batches to the main process through a socket served by a thread of
    its own (multiprocessing's resource sharer). When Ctrl-C stops the main process while it
    reads one, that thread gets a reset connection and would print a traceback:
    :func:`quiet_lost_reader` drops that one error, in workers only.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.excepthook = quiet_lost_reader


def quiet_lost_reader(args: Any) -> None:
    """``threading.excepthook`` of a loader worker: a reset or broken connection (the main
    process stopped reading) is not reported; every other error is, as Python would."""
    if issubclass(args.exc_type, (ConnectionResetError, BrokenPipeError)):
        return
    threading.__excepthook__(args)


def _items(dataset: Union[ReIDDataset, Sequence[Item]]) -> List[Item]:
    return list(dataset.train) if isinstance(dataset, ReIDDataset) else list(dataset)


def build_train_loader(data_cfg: Any, dataset: Union[ReIDDataset, Sequence[Item]], seed: int,
                       rank: int = 0, world_size: int = 1) -> ReIDDataLoader:
    """PK batches of the training images with training transforms.

    ``dataset`` is a :class:`ReIDDataset` (its ``train`` list is used) or a list of items.
    Call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch. Workers are
    persistent when there are any (``data.workers``: a number or ``auto``, see
    :func:`resolve_workers`); augmentation is seeded from ``seed``.
    """
    items = _items(dataset)
    transform = build_transforms(data_cfg.height, data_cfg.width, data_cfg.mean, data_cfg.std, train=True,
                                 flip=data_cfg.flip, random_erasing=data_cfg.random_erasing)
    sampler = PKSampler([pid for _, pid, _ in items], data_cfg.batch_size, data_cfg.num_instances,
                        seed=seed, rank=rank, world_size=world_size,
                        epoch_mode=getattr(data_cfg, "epoch_mode", "images"))
    workers = resolve_workers(data_cfg.workers)
    return ReIDDataLoader(
        ImageDataset(items, transform, mark_bad=True),
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_marking_bad,
        generator=torch.Generator().manual_seed(int(seed) * 1000 + rank),
        worker_init_fn=ignore_sigint if workers > 0 else None,
        skip_bad_images=bool(getattr(data_cfg, "skip_bad_images", False)),
    )


def build_test_loader(data_cfg: Any, items: Sequence[Item], batch_size: Optional[int] = None) -> ReIDDataLoader:
    """The images of ``items`` in order, with test transforms (resize + normalise)."""
    transform = build_transforms(data_cfg.height, data_cfg.width, data_cfg.mean, data_cfg.std, train=False)
    workers = resolve_workers(data_cfg.workers)
    return ReIDDataLoader(
        ImageDataset(items, transform, mark_bad=True),
        batch_size=int(batch_size or data_cfg.test_batch_size),
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_marking_bad,
        worker_init_fn=ignore_sigint if workers > 0 else None,
        # Its own generator: iterating a loader draws a base seed, which would otherwise come
        # from the global RNG and shift the training's augmentation stream by every
        # evaluation (a run evaluated before its checkpoint would not resume like one that was not).
        generator=torch.Generator(),
        skip_bad_images=bool(getattr(data_cfg, "skip_bad_images", False)),
    )


def check_images(dataset: ReIDDataset, skip_bad_images: bool = False, threads: int = 4,
                 progress: bool = False) -> ReIDDataset:
    """Decode every image of every split; raise on the first bad one (in list order) or drop them.

    With ``skip_bad_images`` a copy of ``dataset`` without the bad images is returned and
    they are added to its ``bad_images``. ``progress`` shows a progress display on stderr.
    """
    def probe(item: Item) -> Optional[str]:
        try:
            read_image(item[0])
        except DataError as exc:
            return str(exc)
        return None

    result = copy.copy(dataset)
    result.bad_images = list(dataset.bad_images)
    total = sum(len(getattr(dataset, split)) for split in ("train", "query", "gallery"))
    with ThreadPoolExecutor(max_workers=threads) as pool, \
            ProgressReporter(f"checking {dataset.name} images", total=total, enabled=progress) as bar:
        for split in ("train", "query", "gallery"):
            items = getattr(dataset, split)
            errors = []
            for err in pool.map(probe, items):
                errors.append(err)
                bar.advance()
            for item, err in zip(items, errors):
                if err is not None:
                    if not skip_bad_images:
                        raise DataError(err)
                    result.bad_images.append((item[0], err))
            kept = [item for item, err in zip(items, errors) if err is None]
            setattr(result, split, relabel(kept) if split == "train" else kept)
    return result
