"""Minimal stand-ins for layers that have not landed yet (used by the engine tests only)."""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import torch


def _missing(module: str, attr: str) -> bool:
    try:
        return not hasattr(importlib.import_module(module), attr)
    except Exception:  # a layer half-written by another helper counts as missing
        return True


class _DS:
    def __init__(self, root):
        rng = np.random.RandomState(0)
        self.name, self.protocol = "standin", "market"
        self.train = [(f"{root}/t{p}_{i}", p, i % 2) for p in range(6) for i in range(4)]
        self.query = [(f"{root}/q{p}", p, 0) for p in range(6)]
        self.gallery = [(f"{root}/g{p}_{i}", p, 1) for p in range(6) for i in range(2)]
        self.num_train_pids = 6
        self.colors = rng.rand(6, 3).astype(np.float32)


def install(monkeypatch, real_data: bool) -> None:
    """``real_data``: the data layer's synthetic fixture exists, so keep its dataset builder."""
    if not real_data or _missing("attnreid.data.datasets", "build_dataset_from_config"):
        dmod = types.ModuleType("attnreid.data.datasets")
        monkeypatch.setitem(sys.modules, "attnreid.data.datasets", dmod)

        def build_dataset_from_config(data_cfg):
            from pathlib import Path

            from attnreid.errors import DataError

            if data_cfg.dataset != "synthetic" and not Path(data_cfg.root).exists():
                raise DataError(f"dataset folder not found: {data_cfg.root}")
            return _DS(data_cfg.root)

        monkeypatch.setattr(dmod, "build_dataset_from_config", build_dataset_from_config, raising=False)
    if not real_data or _missing("attnreid.data.loader", "build_train_loader"):
        loader = types.ModuleType("attnreid.data.loader")

        def _image(path, h, w):
            pid = int(path.rsplit("/", 1)[1][1:].split("_")[0])
            g = torch.Generator().manual_seed(abs(hash(path)) % 1000)
            base = torch.tensor(_DS("x").colors[pid]).view(3, 1, 1).expand(3, h, w)
            return base + 0.1 * torch.randn(3, h, w, generator=g)

        class _Items(torch.utils.data.Dataset):
            def __init__(self, items, h, w):
                self.items, self.h, self.w = items, h, w

            def __len__(self):
                return len(self.items)

            def __getitem__(self, i):
                p, pid, cam = self.items[i]
                return _image(p, self.h, self.w), pid, cam, i

        class _PK:
            def __init__(self, n, bs, seed):
                self.n, self.bs, self.seed, self.epoch = n, bs, seed, 0

            def set_epoch(self, e):
                self.epoch = e

            def __iter__(self):
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                perm = torch.randperm(self.n, generator=g).tolist()
                for i in range(0, self.n - self.bs + 1, self.bs):
                    yield perm[i:i + self.bs]

            def __len__(self):
                return self.n // self.bs

        def build_train_loader(data_cfg, dataset, seed, rank=0, world_size=1):
            return torch.utils.data.DataLoader(_Items(dataset.train, data_cfg.height, data_cfg.width),
                                               batch_sampler=_PK(len(dataset.train), data_cfg.batch_size, seed))

        def build_test_loader(data_cfg, items):
            return torch.utils.data.DataLoader(_Items(items, data_cfg.height, data_cfg.width),
                                               batch_size=data_cfg.test_batch_size)

        loader.build_train_loader, loader.build_test_loader = build_train_loader, build_test_loader
        monkeypatch.setitem(sys.modules, "attnreid.data.loader", loader)
    if _missing("attnreid.losses", "build_criterion"):
        import attnreid.losses as lmod

        class _CE(torch.nn.Module):
            def forward(self, outputs, targets):
                terms = {f"ce_{k}": torch.nn.functional.cross_entropy(v, targets) for k, v in outputs["logits"].items()}
                return sum(terms.values()), {k: v.detach() for k, v in terms.items()}

        monkeypatch.setattr(lmod, "build_criterion", lambda loss_cfg, model_cfg: _CE(), raising=False)
    if _missing("attnreid.evaluation.protocols", "evaluate") or _missing("attnreid.evaluation.distance", "compute_distance"):
        prot = types.ModuleType("attnreid.evaluation.protocols")
        distm = types.ModuleType("attnreid.evaluation.distance")

        def compute_distance(qf, gf, metric="euclidean_sq", chunk_size=None):
            return torch.cdist(torch.as_tensor(qf), torch.as_tensor(gf)) ** 2

        def evaluate(qf, gf, q_pids, g_pids, q_camids, g_camids, protocol="market", metric="euclidean_sq",
                     rerank=False, k1=20, k2=6, lambda_value=0.3):
            d = compute_distance(qf, gf).numpy()
            order = np.argsort(d, axis=1)
            match = (np.asarray(g_pids)[order] == np.asarray(q_pids)[:, None])
            aps = []
            for row in match:
                hits = np.where(row)[0]
                aps.append(np.mean([(j + 1) / (h + 1) for j, h in enumerate(hits)]))
            cmc = (np.cumsum(match, 1) > 0).mean(0)
            return {"mAP": float(np.mean(aps)), "rank1": float(cmc[0]), "rank5": float(cmc[min(4, len(cmc) - 1)]),
                    "rank10": float(cmc[min(9, len(cmc) - 1)]), "cmc": cmc.tolist(), "mINP": 0.0,
                    "num_valid_queries": len(q_pids), "num_skipped_queries": 0}

        prot.evaluate, distm.compute_distance = evaluate, compute_distance
        monkeypatch.setitem(sys.modules, "attnreid.evaluation.protocols", prot)
        monkeypatch.setitem(sys.modules, "attnreid.evaluation.distance", distm)
