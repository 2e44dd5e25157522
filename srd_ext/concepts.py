"""Concepts over a dataset: the PFVs of one layer, where each came from, and their neighbours.

The top of the paper's Figure 5: a PFV is read by the PFVs of other images nearest to it, each
shown by its ERF. :class:`ConceptIndex` holds every PFV of one layer over a set of images (one
row per image and position) with its image index, position, ERF box, label and the model's
prediction; :meth:`ConceptIndex.nearest` finds exact cosine nearest neighbours in torch, a chunk of
the index at a time so that memory stays bounded. Saved as ``vectors.npy`` (numpy),
``rows.csv`` (one line per vector) and ``index.json`` (the layer and settings), readable without
srd_ext.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from . import layers as L
from .explain import Explainer
from .how import erf_box
from .rules import to_nchw
from .walk import walk_seeds

__all__ = ["ConceptIndex", "COLUMNS"]

COLUMNS = ("image", "y", "x", "y0", "x0", "y1", "x1", "label", "prediction")


class ConceptIndex:
    """The PFVs of ``layer`` over a dataset.

    ``vectors`` (N, C), float32 or float16; ``rows`` (N, 9) int64 with the columns
    :data:`COLUMNS`: the image's index in the dataset, the position (y, x) at the layer, the ERF
    box (y0, x0, y1, x1) in image pixels, y1 and x1 exclusive (-1 throughout when built without
    boxes or when the ERF is zero), the label (-1 when the dataset has none) and the model's
    predicted class. ``info``: the layer name and the settings it was built with."""

    def __init__(self, vectors: Tensor, rows: Tensor, layer: str, info: Optional[Dict[str, Any]] = None):
        if vectors.dim() != 2 or rows.shape != (vectors.shape[0], len(COLUMNS)):
            raise ValueError(
                f"vectors must be (N, C) and rows (N, {len(COLUMNS)}); got {tuple(vectors.shape)} and {tuple(rows.shape)}"
            )
        self.vectors = vectors
        self.rows = rows.long()
        self.layer = layer
        self.info = dict(info or {})

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def column(self, name: str) -> Tensor:
        """One column of ``rows`` by name (:data:`COLUMNS`)."""
        return self.rows[:, COLUMNS.index(name)]

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: nn.Module,
        images,
        layer: str,
        *,
        batch_size: int = 32,
        progress: bool = True,
        labels: Optional[Sequence[int]] = None,
        indices: Optional[Sequence[int]] = None,
        boxes: bool = True,
        threshold: float = 0.01,
        seeds_per_walk: int = 64,
        dtype: torch.dtype = torch.float32,
        **explainer_options,
    ) -> "ConceptIndex":
        """Every PFV of ``layer`` over ``images``: a tensor (N, C, H, W), or a sequence (a
        dataset) of images or of (image, label) pairs; ``labels`` gives them for a tensor.
        ``indices``: the images to index (default: all), e.g. one process's share, the parts
        joined by :meth:`concat`; rows keep the dataset's image indices. Batched by
        ``batch_size`` (one forward per batch) with a tqdm progress bar.
        ``boxes``: each PFV's ERF box (:func:`srd_ext.how.erf_box`, ``threshold``), from walks of
        unit seeds at every position down to the image, ``seeds_per_walk`` at a time (this is
        most of the cost: ``boxes=False`` skips it). ``dtype``: the stored vectors' (float16
        halves the memory; :meth:`nearest` computes in float32). ``model`` may be an
        :class:`Explainer`; else ``explainer_options`` make one (its ``bias_share`` shapes the
        ERFs)."""
        ex = model if isinstance(model, Explainer) else Explainer(model, **explainer_options)
        n = len(images)
        if labels is not None and len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} images")
        order = list(range(n)) if indices is None else [int(i) for i in indices]
        bar = _bar(len(order), progress, layer)
        vecs, rows, name = [], [], layer
        try:
            for start in range(0, len(order), batch_size):
                which = order[start : start + batch_size]
                x, y = _batch(images, labels, which, ex)
                v, r, name = _index_batch(ex, x, y, torch.tensor(which), layer, boxes, threshold, seeds_per_walk)
                vecs.append(v.to(dtype).cpu())
                rows.append(r)
                bar.update(x.shape[0])
        finally:
            bar.close()
        if not vecs:
            raise ValueError("no images to index")
        info = {
            "layer": name,
            "boxes": boxes,
            "threshold": threshold,
            "bias_share": ex.bias_share,
            "images": len(order),
        }
        return cls(torch.cat(vecs), torch.cat(rows), name, info)

    @classmethod
    def concat(cls, parts: Sequence["ConceptIndex"]) -> "ConceptIndex":
        """One index of the rows of ``parts`` (indices of the same layer, e.g. the shares of
        several processes), in the order given."""
        if not parts or len({p.layer for p in parts}) != 1 or len({p.vectors.shape[1] for p in parts}) != 1:
            raise ValueError("concat needs one or more indices of the same layer and width")
        info = dict(parts[0].info, images=sum(p.info.get("images", 0) for p in parts))
        vectors = torch.cat([p.vectors.to(parts[0].vectors.dtype) for p in parts])
        return cls(vectors, torch.cat([p.rows for p in parts]), parts[0].layer, info)

    # -- files --------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write ``vectors.npy``, ``rows.csv`` (a header line, then one line per vector) and
        ``index.json`` into ``directory`` (made if missing)."""
        os.makedirs(directory, exist_ok=True)
        np.save(os.path.join(directory, "vectors.npy"), self.vectors.cpu().numpy())
        with open(os.path.join(directory, "rows.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            w.writerows(self.rows.tolist())
        with open(os.path.join(directory, "index.json"), "w") as f:
            json.dump({**self.info, "layer": self.layer, "columns": list(COLUMNS)}, f, indent=1)

    @classmethod
    def load(cls, directory: str) -> "ConceptIndex":
        """The index :meth:`save` wrote into ``directory``."""
        vectors = torch.from_numpy(np.load(os.path.join(directory, "vectors.npy")))
        with open(os.path.join(directory, "rows.csv"), newline="") as f:
            r = csv.reader(f)
            header = tuple(next(r))
            if header != COLUMNS:
                raise ValueError(f"{directory}/rows.csv: columns {header}, expected {COLUMNS}")
            rows = torch.tensor([[int(v) for v in line] for line in r], dtype=torch.long)
        with open(os.path.join(directory, "index.json")) as f:
            info = json.load(f)
        info.pop("columns", None)
        return cls(vectors, rows.view(-1, len(COLUMNS)), info["layer"], info)

    # -- search -------------------------------------------------------------------------------
    def nearest(
        self, queries: Tensor, k: int = 5, *, chunk: int = 65536, backend: str = "torch"
    ) -> Tuple[Tensor, Tensor]:
        """Exact cosine nearest neighbours of ``queries`` (Q, C) or (C,) among the stored vectors:
        (similarities (Q, k), row indices (Q, k)), most similar first. The index is read
        ``chunk`` rows at a time (memory: Q x (k + chunk) scores), in float32 (float64 for
        float64 queries). A zero vector has similarity 0 to everything. ``backend="faiss"``:
        the same search by a flat inner-product FAISS index of the normalised vectors (needs
        ``faiss-cpu``; built on first use and kept; float32; results on the CPU)."""
        q = queries.unsqueeze(0) if queries.dim() == 1 else queries
        if q.shape[-1] != self.vectors.shape[1]:
            raise ValueError(f"queries have {q.shape[-1]} channels, the index {self.vectors.shape[1]}")
        k = min(k, len(self))
        if backend == "faiss":
            s, i = self._faiss_search(q, k)
            return (s, i) if queries.dim() == 2 else (s[0], i[0])
        if backend != "torch":
            raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        q = _unit(q.to(work))
        best_s = q.new_full((q.shape[0], 0), float("-inf"))
        best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
        for start in range(0, len(self), chunk):
            v = _unit(self.vectors[start : start + chunk].to(device=q.device, dtype=work))
            s = torch.cat([best_s, q @ v.T], 1)
            i = torch.cat([best_i, torch.arange(start, start + v.shape[0], device=q.device).expand(q.shape[0], -1)], 1)
            best_s, pick = s.topk(min(k, s.shape[1]), dim=1)
            best_i = i.gather(1, pick)
        return (best_s, best_i) if queries.dim() == 2 else (best_s[0], best_i[0])

    def _faiss_search(self, q: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        try:
            import faiss
        except ImportError:
            raise ImportError("backend='faiss' needs FAISS: pip install faiss-cpu") from None
        index = getattr(self, "_faiss", None)
        if index is None or index.ntotal != len(self):
            index = faiss.IndexFlatIP(self.vectors.shape[1])
            index.add(np.ascontiguousarray(_unit(self.vectors.float()).cpu().numpy()))
            self._faiss = index
        s, i = index.search(np.ascontiguousarray(_unit(q.detach().float()).cpu().numpy()), k)
        return torch.from_numpy(s), torch.from_numpy(i).long()


def _unit(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def _bar(total: int, progress: bool, layer: str):
    if progress:
        from tqdm import tqdm

        return tqdm(total=total, desc=f"PFVs of {layer}", unit="img")

    class _Quiet:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Quiet()


def _batch(images, labels, which: Sequence[int], ex: Explainer):
    """Images ``which`` as one tensor on the model's device and dtype, and their labels (-1:
    none)."""
    if isinstance(images, Tensor):
        x = images[list(which)]
        y = [int(labels[i]) for i in which] if labels is not None else [-1] * len(which)
    else:
        pairs = [it if isinstance(it, (tuple, list)) else (it, -1) for it in (images[i] for i in which)]
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = [int(labels[i]) for i in which] if labels is not None else [int(p[1]) for p in pairs]
    p = next(ex.model.parameters(), None)
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype)
    return x, y


def _index_batch(ex: Explainer, x: Tensor, y, which: Tensor, layer: str, boxes, threshold, per_walk):
    """Vectors (b*h*w, C) of one batch and their rows, in (image, y, x) order."""
    with torch.no_grad():
        ex._check_input(x)
        g = ex.graph(x)
        plan = ex._plan(g)
        i = L.resolve(g, plan, layer)
        if i == g.input_index:
            raise ValueError("layer='input' has no PFVs to index; name a layer of the model")
        run = ex._forward(g, plan, x, [i, g.input_index], False)
        vectors, (b, h, w) = _pfvs(g.nodes[i], run.value(i))
        pred = run.value(g.output_index).argmax(-1).cpu()
        img = torch.arange(b).repeat_interleave(h * w)
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1).repeat(b, 1)
        box = torch.full((b * h * w, 4), -1, dtype=torch.long)
        if boxes:
            box = _boxes(run, g, i, img, pos, threshold, per_walk, x.device)
        label = torch.tensor(y, dtype=torch.long)[img]
        rows = torch.cat([which[img][:, None], pos, box, label[:, None], pred[img][:, None]], 1)
    return vectors, rows, g.display_name(i)


def _pfvs(node, v: Tensor):
    """The PFVs (b*h*w, C) of a layer's value, in (image, y, x) order (a token sequence's patch
    tokens on their grid), and (b, h, w)."""
    if L.is_token_node(node):
        bd, td = node.layout
        off, h, w = node.grid
        t = v.movedim((bd, td), (0, 1))
        t = t.reshape(t.shape[0], t.shape[1], -1)[:, off : off + h * w]
        return t.reshape(t.shape[0] * h * w, -1), (t.shape[0], h, w)
    t = to_nchw(v, node.layout)
    b, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(b * h * w, c), (b, h, w)


def _boxes(run, g, i: int, img: Tensor, pos: Tensor, threshold: float, per_walk: int, device) -> Tensor:
    out = []
    for a in range(0, img.shape[0], per_walk):  # boxes as each chunk is walked: its maps are freed
        p = pos[a : a + per_walk].to(device)
        s = img[a : a + per_walk].to(device)
        seeds = L.one_hot(run, i, p, torch.ones(p.shape[0], device=device, dtype=run.value(g.input_index).dtype))
        maps, _ = walk_seeds(run, i, seeds, [g.input_index], sample=s)
        out.extend(b if b is not None else (-1, -1, -1, -1) for b in erf_box(maps[g.input_index], threshold))
    return torch.tensor(out, dtype=torch.long).view(-1, 4)
