"""A low-rank activation predictor per FFN layer (Deja Vu-style): which neurons may be active, before the gate is read.

The magnitude rule needs the whole gate matrix to decide (a third of the FFN bytes every token). The predictor
approximates the gate's pre-activation from the FFN input through rank r: g_hat = (h A) B^T, with A [H, r] the
top-r principal directions of the layer's calibration inputs and B = W_gate A [I, r] (the best rank-r linear
predictor of W_gate h on that input distribution: no training loop, one eigendecomposition). A neuron is
predicted active when |act(g_hat)| exceeds a per-layer cut chosen on calibration tokens so that RECALL of the
truly active ones (|act(W_gate h)| > tau) are kept. A run then reads only the predicted neurons' gate rows, applies
the exact rule to them, and reads up/down for those that pass: a neuron active but not predicted is dropped.

A layer uses its predictor only where it predicts better: on held-out calibration tokens it kept at least
MIN_RECALL of the active neurons while predicting at most MAX_SHARE of all neurons (else reading the gate whole
costs about the same). `<model>/ffn_bundles/predictor_<target>.npz` holds A, B, the cuts, the held-out recall and
predicted share, and which layers use it; written crash-safely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

RECALL = 0.99  # share of calibration tokens' active neurons the cut keeps
MIN_RECALL = 0.95  # held-out recall a layer's predictor needs to be used
MAX_SHARE = 0.85  # ... and at most this share of the neurons predicted active per token
DEFAULT_RANK = 64


@dataclass
class Predictor:
    """Per layer: A [H, r], B [I, r], cut; `use` says which layers decide by it; recall/share measured held out."""

    a: np.ndarray  # [L, H, r]
    b: np.ndarray  # [L, I, r]
    cut: np.ndarray  # [L]
    use: np.ndarray  # [L] bool
    recall: np.ndarray  # [L]
    share: np.ndarray  # [L]

    def predict(self, layer: int, h: torch.Tensor, act) -> torch.Tensor:
        """[B, S, I] bool: neurons predicted active for each token of h [B, S, H]."""
        a, b = self._torch(layer, h)
        return act(torch.matmul(torch.matmul(h, a), b.T)).abs() > float(self.cut[layer])

    def _torch(self, layer: int, h: torch.Tensor):
        key = (layer, h.device, h.dtype)
        cache = self.__dict__.setdefault("_t", {})
        if key not in cache:
            cache[key] = (torch.from_numpy(self.a[layer]).to(h.device, h.dtype),
                          torch.from_numpy(self.b[layer]).to(h.device, h.dtype))
        return cache[key]


def fit(inputs: list[torch.Tensor], gates: list[np.ndarray], thresholds, act, *, rank: int = DEFAULT_RANK) -> Predictor:
    """A predictor per layer from its calibration FFN inputs ([N, H] each), gate matrix ([I, H]) and threshold;
    the last quarter of each layer's tokens is held out to measure recall and predicted share."""
    out: dict[str, list] = {k: [] for k in ("a", "b", "cut", "use", "recall", "share")}
    for x, w, tau in zip(inputs, gates, thresholds):
        x, w = x.float(), torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: the store is read-only
        n = x.shape[0]
        train, held = x[: max(1, 3 * n // 4)], x[3 * n // 4:]
        r = min(rank, x.shape[1])
        _, vecs = torch.linalg.eigh(train.T @ train)  # ascending eigenvalues
        a = vecs[:, -r:]  # [H, r]
        b = w @ a  # [I, r]
        true_tr = act(train @ w.T).abs() > tau
        pred_tr = act((train @ a) @ b.T).abs()
        cut = float(torch.quantile(pred_tr[true_tr].float(), 1 - RECALL)) if true_tr.any() else 0.0
        true_h = act(held @ w.T).abs() > tau
        pred_h = act((held @ a) @ b.T).abs() > cut
        recall = float((pred_h & true_h).sum() / max(1, int(true_h.sum())))
        share = float(pred_h.float().mean()) if held.numel() else 1.0
        for k, v in (("a", a.numpy()), ("b", b.numpy()), ("cut", cut), ("recall", recall), ("share", share),
                     ("use", recall >= MIN_RECALL and share <= MAX_SHARE)):
            out[k].append(v)
    return Predictor(*(np.asarray(out[k]) for k in ("a", "b", "cut", "use", "recall", "share")))


def save(directory: Path, target: float, p: Predictor) -> Path:
    path = Path(directory) / f"predictor_{target:g}.npz"
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, a=p.a, b=p.b, cut=p.cut, use=p.use, recall=p.recall, share=p.share)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load(directory: Path, target: float) -> Predictor | None:
    path = Path(directory) / f"predictor_{target:g}.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return Predictor(z["a"], z["b"], z["cut"], z["use"].astype(bool), z["recall"], z["share"])
