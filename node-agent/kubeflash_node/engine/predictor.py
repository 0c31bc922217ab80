"""A low-rank activation predictor per FFN layer (Deja Vu-style): which neurons may be active, before the gate is read.

The magnitude rule needs the whole gate matrix to decide (a third of the FFN bytes every token). The predictor
approximates the gate's pre-activation from the FFN input (the post-norm hidden state) through rank r:
g_hat = (h A) B^T, A [H, r], B [I, r], the best rank-r linear map to W_gate h on the calibration inputs (reduced-rank
regression: with S the inputs' second moment, the top-r right singular vectors V of W_gate S^1/2 give
A = S^-1/2 V, B = W_gate S^1/2 V; no training loop, two eigendecompositions of [H, H]). A neuron is predicted
active when |act(g_hat)| exceeds a per-layer cut. A run then reads only the predicted neurons' gate rows, applies
the exact rule to them, and reads up/down for those that pass: a neuron active but not predicted is dropped.

The calibration tokens of a layer are split three ways: the first half fits A and B, the next quarter sets the
cut (the score kept by RECALL of that quarter's truly active neurons, |act(W_gate h)| > tau: a cut set on tokens
the fit never saw, so it holds on new tokens of the same kind), and the last quarter measures recall and the share
of neurons predicted. A layer uses its predictor only where that measured recall is at least MIN_RECALL and the
share at most MAX_SHARE (else reading the gate whole costs about the same). `<model>/ffn_bundles/
predictor_<target>.npz` holds A, B, the cuts, the measured recall and predicted share, and which layers use it;
written crash-safely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

RECALL = 0.99  # share of the cut quarter's active neurons the cut keeps
MIN_RECALL = 0.97  # recall on the last quarter a layer's predictor needs to be used
MAX_SHARE = 0.85  # ... and at most this share of the neurons predicted active per token
DEFAULT_RANK = 256


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


def fit(inputs: list[torch.Tensor], gates: list[np.ndarray], thresholds, act, *, rank: int = DEFAULT_RANK,
        recall: float = RECALL) -> Predictor:
    """A predictor per layer from its calibration FFN inputs ([N, H] each), gate matrix ([I, H]) and threshold:
    A and B fitted on the first half of the tokens, the cut set on the next quarter to keep `recall` of its
    active neurons, recall and predicted share measured on the last quarter."""
    out: dict[str, list] = {k: [] for k in ("a", "b", "cut", "use", "recall", "share")}
    for x, w, tau in zip(inputs, gates, thresholds):
        x, w = x.float(), torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: the store is read-only
        n = x.shape[0]
        fit_x, cut_x, held = x[: max(1, n // 2)], x[n // 2: max(n // 2 + 1, 3 * n // 4)], x[3 * n // 4:]
        a, b = reduced_rank(fit_x, w, min(rank, x.shape[1]))
        cut = recall_cut(cut_x, w, a, b, tau, act, recall)
        got, share = measure(held, w, a, b, tau, cut, act)
        for k, v in (("a", a.numpy()), ("b", b.numpy()), ("cut", cut), ("recall", got), ("share", share),
                     ("use", got >= MIN_RECALL and share <= MAX_SHARE)):
            out[k].append(v)
    return Predictor(*(np.asarray(out[k]) for k in ("a", "b", "cut", "use", "recall", "share")))


def reduced_rank(x: torch.Tensor, w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [H, r], B [I, r]): h -> (h A) B^T is the rank-r map closest to h -> w h (w [I, H]) in mean squared
    error over the inputs x [N, H] (float64 inside: the inputs' second moment spans orders of magnitude)."""
    x, w = x.double(), w.double()
    s = x.T @ x / max(1, x.shape[0])  # [H, H]
    s += torch.eye(s.shape[0], dtype=s.dtype) * (1e-6 * float(s.diagonal().mean()) + 1e-12)
    ev, u = torch.linalg.eigh(s)
    half, inv_half = (u * ev.sqrt()) @ u.T, (u * ev.rsqrt()) @ u.T  # S^1/2, S^-1/2
    wh = w @ half  # [I, H]
    _, v = torch.linalg.eigh(wh.T @ wh)  # ascending: the right singular vectors of W S^1/2
    v = v[:, -r:]  # [H, r]
    return (inv_half @ v).float(), (wh @ v).float()


def recall_cut(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tau: float, act,
               recall: float) -> float:
    """The largest score cut that keeps `recall` of the truly active neuron-token pairs of x [N, H]."""
    true = act(x @ w.T).abs() > tau  # [N, I]
    if not true.any():
        return 0.0
    scores = act((x @ a) @ b.T).abs()[true].float()
    if scores.numel() > 1 << 24:  # torch.quantile's limit: an even sample
        scores = scores[:: scores.numel() // (1 << 23) + 1]
    return float(torch.quantile(scores, 1 - recall))


def measure(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tau: float, cut: float,
            act) -> tuple[float, float]:
    """(recall: the share of x's truly active neuron-token pairs predicted, share: of all pairs predicted)."""
    if not x.numel():
        return 0.0, 1.0
    true = act(x @ w.T).abs() > tau
    pred = act((x @ a) @ b.T).abs() > cut
    return float((pred & true).sum() / max(1, int(true.sum()))), float(pred.float().mean())


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
