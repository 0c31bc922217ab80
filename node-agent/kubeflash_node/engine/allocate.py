"""Greedy sparsity allocation (TEAL): how much of a target sparsity each layer's inputs get, from their output error.

Uniform input sparsity gives every layer and every thresholded input the same target. TEAL's greedy allocation
instead spends the target where it hurts least: on calibration tokens, each decoder layer is run with one of its
inputs thresholded at a level (the others dense) and its output compared with the dense output (squared error over
the squared norm of the dense output: the residual stream it lands on); then, starting from nothing dropped, the
level of the input whose next step adds the least error per weight byte saved is raised one step, until the
byte-weighted average level reaches the target: in every layer on its own ("greedy", TEAL's block-wise
allocation, the steps competing within a layer), or over all layers ("greedy-global", the steps competing across
layers too). The inputs: the attention input (before q/k/v), the attention output (before o), the FFN input (before
gate/up), the intermediate (before down); a level's threshold is the calibration's quantile of that input's
magnitudes at that level, as with uniform
allocation, so the on-disk format is the same (store/sparsity.py: per layer, per input, one threshold).

Errors of one layer's inputs are measured apart and added (each measured with the layer's input dense), so this is
an estimate of the block-wise error, not of the model's output; measured on SmolLM2 in docs/sparsity.md.
"""

from __future__ import annotations

import heapq
import math
from typing import Sequence

# `kubeflash calibrate --allocation`, store.sparsity.Calibration.allocation: every layer and input at the target;
# every layer at the target, shared out over its inputs (TEAL's block-wise greedy); shared out over layers too
ALLOCATIONS = ("uniform", "greedy", "greedy-global")
INPUTS = ("attn_in", "attn_out", "ffn_in", "ffn_mid")  # the thresholded inputs of a layer, in this order
STEP = 0.05  # a greedy step: the level an input's sparsity rises by
LEVELS = tuple(round(STEP * i, 2) for i in range(17))  # 0, 0.05, ..., 0.8: the levels an input can take
MEASURED = 2  # errors are measured at every second level (0.1, 0.2, ...), those between interpolated: half the time
EVAL_TOKENS = 128  # calibration tokens the layers' output errors are measured on
ERROR_CAP = 0.25  # an input whose layer error passes this goes no higher (and its higher levels are not measured)


def input_bytes(c) -> tuple[int, int, int, int]:
    """Weight elements per layer behind each input (INPUTS' order): what dropping one of its channels saves."""
    kv = c.num_kv_heads * c.head_dim
    return ((c.q_dim + 2 * kv) * c.hidden_size, c.hidden_size * c.q_dim, 2 * c.intermediate_size * c.hidden_size,
            c.hidden_size * c.intermediate_size)


def average(levels: Sequence[Sequence[float]], sizes: Sequence[int], inputs: Sequence[int]) -> float:
    """The byte-weighted mean level of `inputs` (indices into INPUTS) over every layer."""
    total = sum(sizes[k] for k in inputs) * len(levels)
    return sum(sizes[k] * lv[k] for lv in levels for k in inputs) / total


def allocate(errors: Sequence[Sequence[Sequence[float]]], sizes: Sequence[int], target: float, *,
             inputs: Sequence[int] = (0, 1, 2, 3), per_layer: bool = False) -> list[list[float]]:
    """Per layer, the level of each input (INPUTS' order; those not in `inputs` stay 0) whose byte-weighted mean over
    `inputs` first reaches `target`, raised greedily one step at a time where the error added per byte saved is
    least. errors[l][k][i]: layer l's output error with input k at LEVELS[i] (the others dense). `per_layer`: each
    layer's own mean reaches the target (the steps compete within a layer only: TEAL's block-wise allocation)."""
    if per_layer:
        return [allocate([e], sizes, target, inputs=inputs)[0] for e in errors]
    levels = [[0.0] * len(INPUTS) for _ in errors]
    at = [[0] * len(INPUTS) for _ in errors]  # index into LEVELS
    heap = []

    def push(j: int, k: int) -> None:
        i = at[j][k]
        if i + 1 < len(LEVELS) and math.isfinite(errors[j][k][i + 1]):
            heapq.heappush(heap, ((errors[j][k][i + 1] - errors[j][k][i]) / sizes[k], j, k))

    for j in range(len(errors)):
        for k in inputs:
            push(j, k)
    while average(levels, sizes, inputs) < target - 1e-9:
        if not heap:
            raise ValueError(f"target sparsity {target:g}: more than greedy allocation can reach (every input at "
                             f"its highest level, {LEVELS[-1]:g}, or its error cap)")
        _, j, k = heapq.heappop(heap)
        at[j][k] += 1
        levels[j][k] = LEVELS[at[j][k]]
        push(j, k)
    return levels


class LayerErrors:
    """A layer function (for Engine.layer_fn) that, besides returning the dense output, measures each layer's output
    error with each of `inputs` thresholded at every level in turn; `errors[l][k][i]` when the pass is done.

    `ffn` is the engine's sparse.SparseFFN built with every threshold 0 (and a SparseAttention, when attention inputs
    are allocated); `table[k][i][l]` the threshold of input k of layer l at LEVELS[i]."""

    def __init__(self, layer_fn, ffn, table, *, num_layers: int, inputs: Sequence[int]):
        self.inner, self.ffn, self.table, self.inputs = layer_fn, ffn, table, tuple(inputs)
        self.errors = [[[0.0] * len(LEVELS) for _ in INPUTS] for _ in range(num_layers)]

    def __call__(self, c, w, x, batch, cache, rope, layer: int = 0):
        from .kvcache import LayerKV

        def run():
            return self.inner(c, w, x, batch, LayerKV(None, None, in_place=False), rope, layer=layer)

        y = run()  # [B, S, H] every threshold 0: the dense output
        ref = float(y.float().pow(2).sum())
        for k in self.inputs:
            e = self.errors[layer][k]
            for i in range(MEASURED, len(LEVELS), MEASURED):
                self._set(layer, k, self.table[k][i][layer])
                e[i] = float((run() - y).float().pow(2).sum()) / ref
                for m in range(i - MEASURED + 1, i):  # the levels between: linear in the level
                    e[m] = e[i - MEASURED] + (e[i] - e[i - MEASURED]) * (m - i + MEASURED) / MEASURED
                if e[i] > ERROR_CAP:
                    e[i + 1:] = [math.inf] * (len(LEVELS) - i - 1)
                    break
            self._set(layer, k, 0.0)
        return y

    def _set(self, layer: int, k: int, value: float) -> None:
        if k < 2:
            th = list(self.ffn.attention.th[layer])
            th[k] = value
            self.ffn.attention.th[layer] = tuple(th)
        else:
            th = list(self.ffn.input_th[layer])
            th[k - 2] = value
            self.ffn.input_th[layer] = tuple(th)


def measure(model_dir, rec, ids: Sequence[int], *, device: str = "cpu", attention: bool) -> list:
    """errors[l][k][i] (LayerErrors) on `ids`, with the thresholds of `rec` (the calibration's recorder) at LEVELS."""
    from .attnsparse import SparseAttention
    from .generate import Engine
    from .policy import make_policy
    from .sparse import SparseFFN, sequence_logits

    n = len(rec.in_samples)
    ffn_tab, attn_tab = rec.input_thresholds_at(LEVELS), rec.attention.thresholds_at(LEVELS)
    table = [[[p[k % 2] for p in (attn_tab if k < 2 else ffn_tab)[lv]] for lv in LEVELS] for k in range(len(INPUTS))]
    ffn = SparseFFN([0.0] * n, num_layers=n, target=0.0, inputs=[(0.0, 0.0)] * n,
                    attention=SparseAttention([(0.0, 0.0)] * n, num_layers=n) if attention else None)
    engine = Engine(model_dir, policy=make_policy(gpu_batch_size=1), device=device, sparsity=ffn)
    probe = LayerErrors(engine.layer_fn, ffn, table, num_layers=n, inputs=(0, 1, 2, 3) if attention else (2, 3))
    engine.layer_fn = probe
    try:
        sequence_logits(engine, list(ids))
    finally:
        engine.close()
    return probe.errors


def greedy(rec, errors, config, targets: Sequence[float], *, attention: bool, per_layer: bool = True):
    """(FFN pairs, attention pairs, levels) per target, as store.sparsity.Calibration holds them: the greedy levels'
    thresholds from `rec`; without `attention` only the FFN's inputs are allocated (the attention's stay uniform);
    `per_layer` False: over the layers too (allocation "greedy-global")."""
    inputs = (0, 1, 2, 3) if attention else (2, 3)
    sizes = input_bytes(config)
    ffn_tab, attn_tab = rec.input_thresholds_at(LEVELS), rec.attention.thresholds_at(LEVELS)
    uniform_attn = rec.attention.thresholds_at(targets)
    ffn, attn, levels = {}, {}, {}
    for t in targets:
        lv = allocate(errors, sizes, t, inputs=inputs, per_layer=per_layer)
        levels[t] = tuple(tuple(v) for v in lv)
        ffn[t] = tuple((ffn_tab[v[2]][j][0], ffn_tab[v[3]][j][1]) for j, v in enumerate(lv))
        attn[t] = tuple((attn_tab[v[0]][j][0], attn_tab[v[1]][j][1]) for j, v in enumerate(lv)) if attention \
            else uniform_attn[t]
    return ffn, attn, levels
