"""Activation-sparse FFN: compute only the neurons whose activation matters, and count the bytes that costs.

A neuron i of layer l is active for a token when |a_i| > tau_l, where a is the FFN's activation: act(gate(h)) in
the Llama family (SwiGLU: its up row and down column are then needed, its gate row was needed to decide), the
activation of fc1 in OPT (ReLU: tau 0 is the model's own sparsity, exact, no calibration). tau_l comes from
`kubeflash calibrate` (store/sparsity.py): the per-layer magnitude below which a target share of activations fell
on calibration text (TEAL's training-free thresholds, applied to the gate activation as CATS does). Only the
union of active neurons over a step's tokens is gathered: their up rows ([A, H]) and down columns ([H, A]); each
token still drops its own inactive ones, so a step of many tokens computes exactly what one token at a time would.

`FFNReads` counts, per step, the FFN bytes a dense layer reads and the bytes this one needs: the whole gate
(fc1) matrix, plus one up row and one down column per active neuron (LLM in a flash's neuron bundle), and the
runs of consecutive active neurons (one read each in a bundled layout). The model calls in through one hook:
`llama_layer`/`opt_layer` call `w["sparse_ffn"](c, w, h)` when the engine put one in the layer's weights.

Method "input" (TEAL, Llama family) thresholds the FFN's inputs instead: an entry of the normalized FFN input h
with |h_c| <= tin_l is dropped before gate and up, so only the gate and up columns of the kept input channels are
needed; an entry of the intermediate activation m = act(gate(h)) * up(h) with |m_i| <= tmid_l is dropped before
down, so only the kept neurons' down columns are needed. Nothing is read whole: at a target t a decode token needs
about (1 - t) of all three matrices, against 1/3 + 2/3 (1 - t) above. Both thresholds come from the same
calibration (quantiles of |h| and |m|). Streamed from disk, the columns come from the input-channel files
(store/channels.py: one gate|up bundle per input channel, then the down columns), one read per run.

With `kubeflash calibrate --criterion wina` (WINA, weight-informed) the input method's masks compare |x_c| * c_c
with the threshold instead of |x_c|, c_c the norm of the weight columns entry c multiplies (gate|up columns for the
FFN input, the down column for the intermediate; ColumnNorms), and the thresholds are the quantiles of |x| * c.

With method "input" the attention may be thresholded the same way (attnsparse.py: its input before q/k/v, its
output before o; `attention` below), so that nothing of a layer's seven matrices is read whole.

With neuron bundles (store/bundles.py) a layer streamed from disk arrives without its up/down matrices (the
streamer skips them, `skip_tensors`): the active neurons' bundles come from a `NeuronCache` (neurons.py: a hot
set chosen from calibration frequency, a window of recently active neurons, the rest read from the SSD).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..store.modelconfig import ModelConfig
from .kvcache import LayerKV
from .model import ACTIVATIONS, embed, head, make_batch

HOOK = "sparse_ffn"  # the weight-dict key the model's MLP looks for
RECORD_PER_CALL = 1 << 18  # |activation| samples kept per layer and call while calibrating
RECORD_MAX = 1 << 23  # ... and per layer in all (torch.quantile takes at most 16M values)
FREQ_TOKENS = 512  # whole activation vectors kept per layer while calibrating, for per-neuron frequencies
PRED_TOKENS = 4096  # FFN inputs kept per layer while calibrating (float16), to fit and check the predictors
WINDOW = 5  # decode calls a neuron's bundle stays after it was last active (LLM in a flash's k)
CHANNEL_WINDOW = 0  # the same for input sparsity's channel rows: none (docs/sparsity.md: its memory is not budgeted)
HOT_SHARE = 0.25  # of the job's memory budget on the compute device, for the resident hot neurons
BUNDLED = frozenset({"w_up", "w_down", "fc2_w"})  # matrices a bundled layer's stage is read without


@dataclass
class FFNReads:
    """FFN bytes per step, dense against sparse, split into prefill (many tokens a step) and decode (one)."""

    steps: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})  # layer calls
    tokens: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    dense_bytes: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    read_bytes: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    runs: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})  # reads of a neuron-bundled layout
    bundle_bytes: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})  # read from bundle files
    neurons: int = 0  # neuron-token pairs seen
    inactive: int = 0  # ... of which dropped

    def add(self, phase: str, *, tokens: int, dense: int, read: int, runs: int, neurons: int, inactive: int) -> None:
        self.steps[phase] += 1
        self.tokens[phase] += tokens
        self.dense_bytes[phase] += dense
        self.read_bytes[phase] += read
        self.runs[phase] += runs
        self.neurons += neurons
        self.inactive += inactive

    def summary(self) -> dict:
        """Token sparsity (share of neuron activations dropped) and, per phase, FFN matrix bytes per layer and
        token, dense and sparse, and the reads (runs) per layer call. A step's bytes are shared by its tokens."""
        out: dict = {"token_sparsity": round(self.inactive / self.neurons, 4) if self.neurons else 0.0}
        for p in ("prefill", "decode"):
            if self.tokens[p]:
                out[p] = {"ffn_bytes_per_layer_token_dense": self.dense_bytes[p] / self.tokens[p],
                          "ffn_bytes_per_layer_token_sparse": self.read_bytes[p] / self.tokens[p],
                          "ffn_read_fraction": round(self.read_bytes[p] / self.dense_bytes[p], 4),
                          "runs_per_layer_call": round(self.runs[p] / self.steps[p], 1)}
                if self.bundle_bytes[p]:  # measured: what the bundle reader's preadv calls returned
                    out[p]["bundle_bytes_per_layer_token"] = self.bundle_bytes[p] / self.tokens[p]
        return out


def _decode_needs(s: dict, what: str, layout: str = "") -> str:
    """The run line's decode part from a reads summary `s`: the share of the FFN matrix bytes a decode step needs
    (`what` they are) and the reads a layer call makes; empty before any decode step."""
    if "decode" not in s:
        return ""
    d = s["decode"]
    return (f"; decode needs {100 * d['ffn_read_fraction']:.1f}% of the FFN matrix bytes ({what}), "
            f"{d['runs_per_layer_call']:g} runs a layer{layout}")


class SparseFFN:
    """The sparse FFN of one model: per-layer thresholds (None: record activations for calibration instead)."""

    def __init__(self, thresholds: Sequence[float] | None, *, num_layers: int, target: float | None = None,
                 source: str = "calibrated", bundles=None, hot: list[list[int]] | None = None,
                 window: int = 0, gap: int = 0, inputs: Sequence[tuple[float, float]] | None = None,
                 channels=None, attention=None, scales: dict | None = None):
        self.thresholds = None if thresholds is None else [float(t) for t in thresholds]
        # criterion wina (store.sparsity.CRITERIA): the FFN input's and intermediate's column norms, masks on |x| * c
        # (recording: the samples are |x| * c); None: magnitude, masks on |x|
        self.scales = None if scales is None else ColumnNorms(scales["ffn_in"], scales["ffn_mid"])
        self.criterion = "magnitude" if scales is None else "wina"
        # method "input" (TEAL): per layer (threshold on |FFN input|, on |intermediate|); "gate" (CATS) otherwise
        self.input_th = None if inputs is None else [(float(a), float(b)) for a, b in inputs]
        self.method = "gate" if self.input_th is None else "input"
        self.channels = channels  # store.channels.ChannelReader: gate/up columns and down columns, per run
        self.channel_gaps = (0, 0)  # runs of kept input channels / down columns this many apart are read as one
        self.bundles = bundles  # store.bundles.BundleReader: up rows / down columns read from the bundle files
        self.hot, self.window = hot, window  # hot neuron ids per layer, kept; decode calls a read bundle stays
        self.gap = gap  # runs of missing neurons this many inactive ones apart are read as one (neurons.merged)
        self.choice: tuple[str, str] | None = None  # (sparse | dense, why): the reads the cost model picked
        self.neurons = None  # neurons.NeuronCache, built on first use (on the compute device)
        self.predictor, self.gates = None, None  # predictor.Predictor and store.bundles.GateRows (with_predictor)
        self.timings = None  # the engine's Timings: bundle reads are counted there (load_neurons)
        self.target, self.source = target, source  # source: calibrated | relu (OPT's own zeros) | record
        self.reads = FFNReads()
        self.samples: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.vectors: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # [n, I] float16, recording
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # [n, H] float16 FFN inputs
        self.in_samples: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # |FFN input| samples
        self.mid_samples: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # |act(gate) * up| samples
        self.mid_vectors: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # [n, I] float16 |intermediate|
        self._gen = torch.Generator().manual_seed(0)
        self._mid_gen = torch.Generator().manual_seed(2)
        self._layers = [self._for_layer(j) for j in range(num_layers)]
        self.attention = attention  # attnsparse.SparseAttention (method "input" or recording) or None: dense attention
        self.attention_asked: bool | None = None  # the caller's `attention` (for_job): True is kept even if slower
        self.attention_why: str | None = None  # FFN-only or FFN+attention, as the cost model priced them (why)
        self.dense_layers: frozenset[int] = frozenset()  # input method: layers streamed with their FFN whole
        self.layers_why: str | None = None  # layerreads.LayerReads.line(): the per-layer choice and why
        # input method with a hot set: channelcache.hot_pricing's (bytes, (frequency, bytes) pairs, hit share),
        # what the cost model prices the hot set with (job.py); None: no hot set
        self.channel_hot: tuple | None = None
        self.channel_gpu: tuple | None = None  # the same of its device tier (hold_on_device); None: none
        # input method: the input-channel files' [L, H + I] keep frequencies at `target` (store.channels.frequency),
        # loaded once at job start (for_job) for the hot set, its device tier and the per-layer choice; None: none
        self.channel_freq = None

    @classmethod
    def recorder(cls, num_layers: int, scales: dict | None = None) -> SparseFFN:
        """Records the samples calibration takes its thresholds from; with `scales` (store.sparsity.SCALES: column
        norms) the input method's and the attention's samples are |x| * c (criterion wina), else |x|."""
        from .attnsparse import SparseAttention

        rec = cls(None, num_layers=num_layers, source="record", scales=scales)
        gen = torch.Generator().manual_seed(1)  # its own: the FFN's samples (and thresholds) stay what they were
        rec.attention = SparseAttention(None, num_layers=num_layers, scales=scales,
                                        sampler=lambda kept, t: rec._keep_flat(kept, t, RECORD_MAX // 4, gen))
        return rec

    def wrap(self, layer_fn: Callable) -> Callable:
        """`layer_fn` with this layer's sparse FFN (and sparse attention, when on) handed to the model in its
        weight dict."""
        from .attnsparse import HOOK as ATTN

        def sparse_layer(c, w, x, batch, cache, rope, layer: int = 0):
            hooks = {HOOK: self._layers[layer]}
            if self.attention is not None:
                self.attention.timings = self.timings
                hooks[ATTN] = self.attention.layers[layer]
            return layer_fn(c, {**w, **hooks}, x, batch, cache, rope, layer=layer)
        return sparse_layer

    def with_predictor(self, predictor, gates) -> SparseFFN:
        """Layers whose predictor is in use (predictor.use) read only the predicted neurons' gate rows (`gates`,
        a store.bundles.GateRows) when streamed."""
        self.predictor, self.gates = predictor, gates
        return self

    def follow(self, sparse_reads: bool, why: str) -> SparseFFN:
        """Read as the cost model picked: sparse keeps the bundles; dense reads every streamed layer whole and
        gathers the active neurons from its matrices (the same neurons, the same outputs)."""
        self.choice = ("sparse" if sparse_reads else "dense", why)
        if not sparse_reads and self.channels is not None:  # the same kept columns, gathered from whole layers
            self.channels.close()
            self.channels = None
        if not sparse_reads and self.attention is not None:
            self.attention.close()
        if not sparse_reads and self.bundles is not None:
            self.bundles.close()
            self.bundles = None
            if self.gates is not None:  # a deciding predictor takes its rows from the whole gate now
                self.gates.close()
                self.gates = None
        return self

    def readers(self) -> list:
        """The store readers (store/bundles.py's row files) the rows are read with: neuron bundles, gate rows, the
        input-channel files (under a channel cache too), the attention's channel files."""
        found = (self.bundles, self.gates, getattr(self.channels, "reader", self.channels),
                 None if self.attention is None else self.attention.channels)
        return [r for r in found if r is not None]

    def io(self, *, threads: int, task_bytes: int, direct: bool = False) -> SparseFFN:
        """Read rows as the weight streamer reads a layer (the engine passes its policy's io_threads and
        io_task_bytes): up to `threads` reads in flight, tasks of at most `task_bytes`; O_DIRECT where `direct` and
        the rows are 4 KiB-aligned (off in the engine; bench/sparse_decode.py --rows-odirect)."""
        for r in self.readers():
            r.io(threads=threads, task_bytes=task_bytes, direct=direct)
        return self

    def reads_in_flight(self) -> dict:
        """The row reads' seconds summed over the preadv calls (read_s), the seconds the engine waited for them
        (wait_s), and their ratio: the mean number of reads in flight while it waited."""
        read_s = sum(r.read_s for r in self.readers())
        wait_s = sum(r.wait_s for r in self.readers())
        return {"read_s": read_s, "wait_s": wait_s, "mean": read_s / wait_s if wait_s else 0.0}

    @property
    def attention_priced(self) -> bool:
        """Whether the attention's sparsity changes the reads (its channel files are open), so the cost model
        prices FFN-only against FFN+attention before the run (price_attention)."""
        return self.attention is not None and self.attention.channels is not None

    def per_layer(self, choice) -> SparseFFN:
        """Read the FFN whole in the layers `choice` (a layerreads.LayerReads) prices dense, the kept columns in the
        rest (input method; the same kept columns either way, so the same outputs)."""
        self.dense_layers, self.layers_why = choice.dense_layers, choice.line()
        return self

    def price_attention(self, attn_s: float, ffn_s: float) -> bool:
        """Keep the attention's input sparsity where it is predicted faster (`attn_s`) than FFN-only (`ffn_s`) or
        the caller asked for it; else drop it (the attention computed and read whole). True: kept."""
        from .costmodel import attention_choice

        use, self.attention_why = attention_choice(attn_s, ffn_s, asked=self.attention_asked is True)
        if not use:
            self.attention.close()
            self.attention = None
        return use

    def skip_tensors(self, stage: int) -> frozenset[str]:
        """Tensors streamed stage `stage` may be read without (the bundles hold up/down; a layer whose predictor
        decides needs only the predicted gate rows), for the WeightStreamer."""
        if self.channels is not None and 1 <= stage <= len(self.thresholds):  # every column needed: channel files
            attn = self.attention is not None and self.attention.channels is not None
            ffn = set() if stage - 1 in self.dense_layers else {"w_gate", "w_up", "w_down"}
            return frozenset(ffn | ({"wq", "wk", "wv", "wo"} if attn else set()))
        if self.bundles is None or not 1 <= stage <= len(self.thresholds):
            return frozenset()
        if self.predictor is not None and self.predictor.use[stage - 1]:
            return BUNDLED | {"w_gate"}
        return BUNDLED

    def line(self) -> str:
        """One line for `kubeflash run`'s output."""
        s = self.reads.summary()
        out = f"sparsity {self.target:g} ({self.source}): {100 * s['token_sparsity']:.1f}% of FFN activations dropped"
        if self.method == "input":
            return out + self._input_line(s)
        out += _decode_needs(s, "gate whole, up/down of active neurons", " in a neuron-bundled layout")
        if self.predictor is not None:
            out += f"; low-rank predictor decides in {int(self.predictor.use.sum())} of {len(self.thresholds)} layers"
        if self.choice is not None:
            out += f"; {self.choice[1]}"
        w = self.weights()
        if w is None:
            if self.choice is None:
                out += "; no neuron bundles (kubeflash calibrate --bundle), so streamed layers are read whole"
        elif w["dense"]:
            out += (f"; weights read {w['read'] / 2**20:.1f} MiB of {w['dense'] / 2**20:.1f} MiB dense "
                    f"({100 * w['read'] / w['dense']:.1f}%)")
            if self.neurons is not None and self.neurons.hits + self.neurons.misses:
                n = self.neurons
                out += (f", neuron cache hit {100 * n.hits / (n.hits + n.misses):.1f}% (hot set "
                        f"{n.hot_bytes / 2**20:.1f} MiB, window {self.window})")
        return out

    def _input_line(self, s: dict) -> str:
        out = " (input sparsity: FFN inputs before gate/up, intermediate before down)"
        if self.criterion != "magnitude":
            out += f"; criterion {self.criterion} (|x| x weight column norm against the threshold)"
        out += _decode_needs(s, "gate/up columns of kept input channels, down columns of kept neurons")
        if self.attention_why is not None:
            out += f"; {self.attention_why}"
        if self.choice is not None:
            out += f"; {self.choice[1]}"
        if self.layers_why is not None:
            out += f"; {self.layers_why}"
        if self.channels is None and self.choice is None:
            out += "; no input-channel files (kubeflash calibrate writes them), so streamed layers are read whole"
        elif self.channels is not None:
            out += f"; {self.channels.bytes_read / 2**20:.1f} MiB read from the input-channel files"
            c = self.channel_cache()
            if c is not None:
                dev = f"{c['device_bytes'] / 2**20:.1f} MiB on the compute device + " if c["device_bytes"] else ""
                out += (f" (rows held: hot set {dev}{c['hot_bytes'] / 2**20:.1f} MiB in host memory, window {c['window']}, "
                        f"{100 * c['hit_rate']:.1f}% of kept rows served from them, peak held "
                        f"{c['peak_held_bytes'] / 2**20:.1f} MiB)")
        if self.attention is not None:
            a = self.attention.summary()
            out += f"; attention inputs: {100 * a['token_sparsity']:.1f}% dropped"
            if "decode" in a:
                out += f", decode needs {100 * a['decode']['attn_read_fraction']:.1f}% of the q/k/v/o bytes"
            if self.attention.channels is not None:
                out += f" ({self.attention.channels.bytes_read / 2**20:.1f} MiB read from the attention channel files)"
        return out

    def channel_cache(self) -> dict | None:
        """The input-channel rows' hot set and window (channelcache.ChannelCache), or None where there is none."""
        c = self.channels
        if not hasattr(c, "window"):
            return None
        return {"hot_bytes": c.hot_bytes, "window": c.window, "hits": c.hits, "misses": c.misses, "hit_bytes": c.hit_bytes,
                "hit_rate": c.hits / max(1, c.hits + c.misses), "peak_held_bytes": c.peak_held_bytes,
                "device_bytes": c.device_bytes, "device_hit_bytes": c.device_hit_bytes, "h2d_bytes": c.h2d_bytes,
                "held_h2d_bytes": c.held_h2d_bytes}

    def weights(self) -> dict | None:
        """Weight bytes the engine read and would have read dense (None without bundles or an engine)."""
        t = self.timings
        if self.bundles is None or t is None:
            return None
        base = t.bytes["load_weight"] + t.bytes["load_weight_resident"]
        return {"read": base + t.bytes["load_neurons"] + t.bytes["load_neurons_resident"],
                "dense": base + t.bytes["load_weight_skipped"], "neurons": t.bytes["load_neurons"]}

    def describe(self) -> dict:
        out = {"target": self.target, "source": self.source, "method": self.method, **self.reads.summary()}
        if self.channels is not None:
            out["channel_bytes_read"], out["channel_reads"] = self.channels.bytes_read, self.channels.reads
            if self.channel_cache() is not None:
                out["channel_cache"] = self.channel_cache()
        if self.method == "input":
            out["channel_merge_gaps"] = list(self.channel_gaps)
            out["criterion"] = self.criterion
        if self.readers():
            out["reads_in_flight_mean"] = round(self.reads_in_flight()["mean"], 2)
        if self.attention is not None and self.attention.th is not None:
            out["attention"] = self.attention.summary()
            if self.attention.channels is not None:
                out["attention"]["channel_bytes_read"] = self.attention.channels.bytes_read
                out["attention"]["channel_reads"] = self.attention.channels.reads
        if self.choice is not None:
            out["reads"], out["reads_why"] = self.choice
        if self.attention_why is not None:
            out["attention_why"] = self.attention_why
        if self.layers_why is not None:
            out["dense_layers"], out["layers_why"] = sorted(self.dense_layers), self.layers_why
        if self.bundles is not None:
            out["bundle_bytes_read"], out["bundle_reads"] = self.bundles.bytes_read, self.bundles.reads
            out["merge_gap"] = self.gap
            w = self.weights()
            if w is not None:
                out["weights_bytes_read"], out["weights_bytes_dense"] = w["read"], w["dense"]
            if self.neurons is not None:
                n = self.neurons
                out["neuron_cache"] = {"hits": n.hits, "misses": n.misses, "hot_bytes": n.hot_bytes,
                                       "window": self.window, "held_bytes": n.held_bytes()}
        if self.predictor is not None:
            out["predictor_layers"] = [int(j) for j in self.predictor.use.nonzero()[0]]
            if self.gates is not None:
                out["gate_row_bytes_read"] = self.gates.bytes_read
        return out

    def close(self) -> None:
        for r in (self.bundles, self.gates, self.channels):
            if r is not None:
                r.close()
        if self.attention is not None:
            self.attention.close()

    def _for_layer(self, j: int) -> Callable:
        def ffn(c: ModelConfig, w: dict, h: torch.Tensor) -> torch.Tensor:
            return self.ffn(c, w, h, j)
        return ffn

    def ffn(self, c: ModelConfig, w: dict, h: torch.Tensor, layer: int) -> torch.Tensor:
        # h: [B, S, H] the normalized FFN input -> [B, S, H] the FFN output
        llama = c.architecture != "opt"
        if llama and self.input_th is not None:
            return self._input_sparse(c, w, h, layer)
        if llama and self.predictor is not None and self.predictor.use[layer]:  # the predictor decides
            a, keep, active, gate_rows = self._predicted(c, w, h, layer)
        else:
            first, first_b = (w["w_gate"], w.get("b_gate")) if llama else (w["fc1_w"], w.get("fc1_b"))
            a = ACTIVATIONS[c.hidden_act](F.linear(h, first, first_b))  # [B, S, I]
            if self.thresholds is None:
                self._record(layer, a, h)
                keep = torch.ones_like(a, dtype=torch.bool)
            else:
                keep = a.abs() > self.thresholds[layer]  # [B, S, I]
            active = keep.reshape(-1, keep.shape[-1]).any(0).nonzero().squeeze(1)  # [A] union over the step's tokens
            a = a.index_select(-1, active).masked_fill_(~keep.index_select(-1, active), 0)  # [B, S, A]
            gate_rows = None
        self._count(c, h, keep, active, gate_rows)
        if ("w_down" if llama else "fc2_w") not in w:  # streamed without up/down: from the neuron bundles
            return self._bundled(w, llama, layer, a, active, h)
        up, down = self._gather(w, llama, layer, active, h)
        if llama:
            a = a.mul_(F.linear(h, up, _rows(w.get("b_up"), active)))
            if self.thresholds is None:  # calibrating: the input and intermediate magnitudes, for method "input"
                self._record_inputs(layer, h, a)
        return F.linear(a, down, w.get("b_down" if llama else "fc2_b"))

    def _input_sparse(self, c: ModelConfig, w: dict, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The FFN output [B, S, H] with input sparsity (TEAL): h's entries at most tin in magnitude dropped before
        gate/up, the intermediate's at most tmid before down; only the kept channels' columns are used (union over
        the step's tokens, each token's own drops zeroed), so it equals the dense FFN on the masked tensors."""
        t_in, t_mid = self.input_th[layer]
        hidden, inter = h.shape[-1], c.intermediate_size
        keep_in = over(h, t_in, norms_of(self.scales, 0, layer, h.device))  # [B, S, H]
        ch = keep_in.reshape(-1, hidden).any(0).nonzero().squeeze(1)  # [K] kept input channels, union
        hk = h.index_select(-1, ch) * keep_in.index_select(-1, ch)  # [B, S, K]
        if "w_gate" in w:
            gate, up = w["w_gate"].index_select(1, ch), w["w_up"].index_select(1, ch)  # [I, K] each
        else:  # streamed without the FFN matrices: the kept channels' gate|up bundles
            rows = self._channel_rows(layer, ch, h, down=False)  # [K, 2I]
            gate, up = rows[:, :inter].T, rows[:, inter:].T
        m = ACTIVATIONS[c.hidden_act](F.linear(hk, gate, w.get("b_gate"))) * F.linear(hk, up, w.get("b_up"))
        keep = over(m, t_mid, norms_of(self.scales, 1, layer, m.device))  # [B, S, I]
        active = keep.reshape(-1, inter).any(0).nonzero().squeeze(1)  # [A]
        mk = m.index_select(-1, active).masked_fill_(~keep.index_select(-1, active), 0)  # [B, S, A]
        down = w["w_down"].index_select(1, active) if "w_down" in w else \
            self._channel_rows(layer, active, h, down=True).T  # [H, A]
        self._count_inputs(c, h, keep_in, ch, keep, active)
        return F.linear(mk, down, w.get("b_down"))

    def _channel_rows(self, layer: int, ids: torch.Tensor, h: torch.Tensor, *, down: bool) -> torch.Tensor:
        """Rows of the input-channel files for the sorted ids: gate|up bundles [K, 2I] or down columns [A, H], read
        one run at a time (runs at most channel_gaps apart read as one, the extra rows dropped)."""
        from .neurons import read_kept

        cached = hasattr(self.channels, "window")  # a channelcache.ChannelCache: the window keeps decode reads
        if cached:  # its device tier's rows stay where they are; the rest are read and copied to h's device
            got, n = self.channels.gather(layer, ids, self.channel_gaps[1 if down else 0], down=down,
                                          decode=h.shape[1] == 1, device=h.device, dtype=h.dtype,
                                          timings=self.timings)
            self.reads.bundle_bytes["decode" if h.shape[1] == 1 else "prefill"] += n
            return got
        got, n = read_kept(self.channels, layer, ids, self.channel_gaps[1 if down else 0], out=down,
                           timings=self.timings, decode=(h.shape[1] == 1) if cached else None)
        self.reads.bundle_bytes["decode" if h.shape[1] == 1 else "prefill"] += n
        return got.to(h.device, h.dtype)

    def _count_inputs(self, c: ModelConfig, h: torch.Tensor, keep_in: torch.Tensor, ch: torch.Tensor,
                      keep: torch.Tensor, active: torch.Tensor) -> None:
        """Matrix bytes of an input-sparse call: a gate and an up column per kept input channel, a down column per
        kept neuron, in runs of consecutive ones (one read each in the input-channel files)."""
        size, hidden, inter = h.element_size(), c.hidden_size, c.intermediate_size
        runs = sum(int((ids.diff() != 1).sum()) + 1 for ids in (ch, active) if ids.numel())
        self.reads.add("decode" if h.shape[1] == 1 else "prefill", tokens=h.shape[0] * h.shape[1],
                       dense=3 * inter * hidden * size, read=(2 * inter * ch.numel() + hidden * active.numel()) * size,
                       runs=runs, neurons=keep_in.numel() + keep.numel(),
                       inactive=keep_in.numel() + keep.numel() - int(keep_in.sum()) - int(keep.sum()))

    def _bundled(self, w: dict, llama: bool, layer: int, a: torch.Tensor, active: torch.Tensor,
                 h: torch.Tensor) -> torch.Tensor:
        """The FFN output [B, S, H] from the active neurons' bundles, piece by piece as the neuron cache hands them
        out (neurons.NeuronCache.pieces: on the CPU spans of the layer's bundle image, multiplied in place with the
        inactive neurons' activations 0 while the next span's missing bundles are still read; elsewhere the gathered
        bundles). a: [B, S, A] activations of `active` [A]."""
        if self.neurons is None:
            from .neurons import NeuronCache

            self.neurons = NeuronCache(self.bundles, num_layers=len(self.thresholds), device=h.device, dtype=h.dtype,
                                       hot=self.hot, window=self.window, timings=self.timings, gap=self.gap)
        phase, before = "decode" if h.shape[1] == 1 else "prefill", self.bundles.bytes_read
        hidden, out, full, one = h.shape[-1], None, None, h.shape[0] * h.shape[1] == 1
        b_up = w.get("b_up")
        for sel, rows in self.neurons.pieces(layer, active.cpu(), decode=phase == "decode"):  # rows [k, 2H] | [k, H]
            if isinstance(sel, slice):  # neuron ids lo..hi-1 of the bundle image: inactive ones get activation 0
                if full is None:
                    full = a.new_zeros(*a.shape[:-1], self.bundles.neurons).index_copy_(-1, active, a)  # [B, S, I]
                ak, bias_up = full[..., sel], None if b_up is None else b_up[sel]
            else:  # positions in `active`
                sel = sel.to(a.device)
                ak, bias_up = a.index_select(-1, sel), None if b_up is None else b_up.index_select(0, active[sel])
            down = rows[:, hidden:] if llama else rows  # [k, H] down columns as rows (views, no copy)
            if one:  # one token: matrix-vector products, the cheapest on the CPU
                if llama:
                    up = torch.mv(rows[:, :hidden], h.reshape(-1))  # [k]
                    ak = ak * (up if bias_up is None else up.add_(bias_up))
                y = torch.mv(down.T, ak.reshape(-1)).view(h.shape)  # [1, 1, H]
            else:
                if llama:
                    up = F.linear(h, rows[:, :hidden], bias_up)  # [B, S, k]
                    ak = ak * up
                y = F.linear(ak, down.T)  # [B, S, H]
            out = y if out is None else out.add_(y)
        self.reads.bundle_bytes[phase] += self.bundles.bytes_read - before
        if out is None:  # no active neuron
            out = h.new_zeros(h.shape)
        bias = w.get("b_down" if llama else "fc2_b")
        return out if bias is None else out.add_(bias)

    def _predicted(self, c: ModelConfig, w: dict, h: torch.Tensor, layer: int):
        """(activations [B, S, A] of the active neurons, keep mask [B, S, P] over the predicted ones, active ids [A],
        gate rows read P): the predictor names P candidate neurons, only their gate rows are read, and the
        threshold rule runs on them; a neuron not predicted is dropped."""
        act = ACTIVATIONS[c.hidden_act]
        cand = self.predictor.predict(layer, h, act)  # [B, S, I]
        ids = cand.reshape(-1, cand.shape[-1]).any(0).nonzero().squeeze(1)  # [P]
        gate = w["w_gate"].index_select(0, ids) if "w_gate" in w else self._gate_rows(layer, ids, h)  # [P, H]
        a = act(F.linear(h, gate, _rows(w.get("b_gate"), ids)))  # [B, S, P]
        keep = (a.abs() > self.thresholds[layer]) & cand.index_select(-1, ids)  # [B, S, P]
        sel = keep.reshape(-1, keep.shape[-1]).any(0).nonzero().squeeze(1)  # [A] positions among the predicted
        a = a.index_select(-1, sel).masked_fill_(~keep.index_select(-1, sel), 0)
        self.reads.neurons += cand.numel() - keep.numel()  # the unpredicted neuron-token pairs: all dropped
        self.reads.inactive += cand.numel() - keep.numel()
        return a, keep, ids[sel], ids.numel()

    def _gate_rows(self, layer: int, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        from .neurons import as_torch

        t0, before = time.perf_counter(), self.gates.bytes_read
        rows = as_torch(self.gates.read(layer, ids.tolist())).to(h.device, h.dtype)
        if self.timings is not None:
            self.timings.add("load_neurons", time.perf_counter() - t0, bytes=self.gates.bytes_read - before)
        return rows

    def _gather(self, w: dict, llama: bool, layer: int, active: torch.Tensor, h: torch.Tensor):
        """(up rows [A, H] or None for OPT, down columns [H, A]) of the active neurons: from the layer's weights,
        or read from the neuron bundles."""
        if ("w_down" if llama else "fc2_w") in w:
            down = (w["w_down"] if llama else w["fc2_w"]).index_select(1, active)
            return (w["w_up"].index_select(0, active) if llama else None), down
        if self.neurons is None:
            from .neurons import NeuronCache

            self.neurons = NeuronCache(self.bundles, num_layers=len(self.thresholds), device=h.device, dtype=h.dtype,
                                       hot=self.hot, window=self.window, timings=self.timings, gap=self.gap)
        before = self.bundles.bytes_read
        rows = self.neurons.rows(layer, active.cpu(), decode=h.shape[1] == 1)  # [A, 2H] | [A, H]
        self.reads.bundle_bytes["decode" if h.shape[1] == 1 else "prefill"] += self.bundles.bytes_read - before
        hidden = h.shape[-1]
        return (rows[:, :hidden], rows[:, hidden:].T) if llama else (None, rows.T)

    def _count(self, c: ModelConfig, h: torch.Tensor, keep: torch.Tensor, active: torch.Tensor,
               gate_rows: int | None = None) -> None:
        """Matrix bytes of this call: dense reads every matrix; sparse the gate (fc1) matrix, which decides, and an
        up row and a down column (OPT: an fc2 column) per active neuron, in runs of consecutive neurons."""
        size, rest = h.element_size(), 1 if c.architecture == "opt" else 2  # gate/fc1 [I, H]; up [I, H], down [H, I]
        first = (c.intermediate_size if gate_rows is None else gate_rows) * c.hidden_size * size
        dense = (1 + rest) * c.intermediate_size * c.hidden_size * size
        per_neuron = rest * c.hidden_size * size
        runs = int((active.diff() != 1).sum()) + 1 if active.numel() else 0
        tokens = h.shape[0] * h.shape[1]
        self.reads.add("decode" if h.shape[1] == 1 else "prefill", tokens=tokens, dense=dense,
                       read=first + active.numel() * per_neuron, runs=runs, neurons=keep.numel(),
                       inactive=keep.numel() - int(keep.sum()))

    def _record(self, layer: int, a: torch.Tensor, h: torch.Tensor) -> None:
        vecs = a.detach().abs().reshape(-1, a.shape[-1]).to("cpu", torch.float16)  # [T, I]
        ins = h.detach().reshape(-1, h.shape[-1]).to("cpu", torch.float16)  # [T, H] the FFN inputs, for predictors
        self._sample(self.vectors[layer], vecs, FREQ_TOKENS)
        self._sample(self.inputs[layer], ins, PRED_TOKENS)
        self._keep_flat(self.samples[layer], a)

    def _record_inputs(self, layer: int, h: torch.Tensor, m: torch.Tensor) -> None:
        s = self.scales  # wina: the quantiles are taken of |x| * c
        self._keep_flat(self.in_samples[layer], h if s is None else scaled(h, s.get(0, layer, h.device)),
                        RECORD_MAX // 4)  # 2M samples a quantile: plenty, and bounded
        self._keep_flat(self.mid_samples[layer], m if s is None else scaled(m, s.get(1, layer, m.device)),
                        RECORD_MAX // 4)
        self._sample(self.mid_vectors[layer], m.detach().abs().reshape(-1, m.shape[-1]).to("cpu", torch.float16),
                     FREQ_TOKENS, self._mid_gen)  # its own generator: the thresholds' samples stay what they were

    def _keep_flat(self, kept: list[torch.Tensor], a: torch.Tensor, most: int = RECORD_MAX, gen=None) -> None:
        """Keep a uniform sample of |a|'s entries (at most RECORD_PER_CALL a call, `most` in all) in `kept`."""
        flat = a.detach().abs().reshape(-1).float().cpu()
        if flat.numel() > RECORD_PER_CALL:
            flat = flat[torch.randint(flat.numel(), (RECORD_PER_CALL,), generator=gen or self._gen)]
        kept.append(flat)
        if sum(t.numel() for t in kept) > most:
            allv = torch.cat(kept)
            kept[:] = [allv[torch.randint(allv.numel(), (most // 2,), generator=gen or self._gen)]]

    def _sample(self, kept: list[torch.Tensor], rows: torch.Tensor, most: int, gen=None) -> None:
        """Keep up to `most` of the rows seen so far in `kept`, a uniform sample of the calls' rows."""
        gen = gen or self._gen
        kept.append(rows[torch.randperm(rows.shape[0], generator=gen)[:most]])
        if sum(v.shape[0] for v in kept) > most:
            allv = torch.cat(kept)
            kept[:] = [allv[torch.randperm(allv.shape[0], generator=gen)[:most]]]

    def thresholds_at(self, targets: Sequence[float]) -> dict[float, tuple[float, ...]]:
        """Per target: each layer's |activation| quantile at that target over what was recorded. A target of 0
        keeps every neuron whose activation is not exactly zero."""
        if not all(self.samples):
            raise ValueError("calibration recorded no activations for some layer (no text was run)")
        qs = torch.tensor(sorted(targets), dtype=torch.float64)
        out: dict[float, list[float]] = {float(t): [] for t in qs}
        for kept in self.samples:
            vals = torch.cat(kept).double()
            for t, v in zip(qs.tolist(), torch.quantile(vals, qs).tolist()):
                out[t].append(0.0 if t == 0 else float(v))
        return {t: tuple(v) for t, v in out.items()}


    def input_thresholds_at(self, targets: Sequence[float]) -> dict[float, tuple[tuple[float, float], ...]]:
        """Per target: each layer's (|FFN input| quantile, |intermediate| quantile) at that target (method "input";
        0: keep every entry that is not exactly zero). Empty when no gated FFN was recorded (OPT)."""
        return paired_quantiles(self.in_samples, self.mid_samples, targets)

    def frequency_at(self, thresholds: Sequence[float]):
        """[L, I] float32 numpy: per layer and neuron, the share of recorded tokens on which it was active
        (|a| above the layer's threshold), over the sampled activation vectors."""
        import numpy as np

        return np.stack([(torch.cat(v).float() > t).float().mean(0).numpy() for v, t in zip(self.vectors, thresholds)])


    def input_frequency_at(self, inputs: Sequence[tuple[float, float]]):
        """[L, H + I] float32 numpy (method "input"): per layer, the share of recorded tokens on which each FFN input
        channel (first H) and each intermediate neuron (last I) was kept at the layer's (input, intermediate)
        thresholds: what the input-channel files' hot set is chosen from (channelcache.hot_rows). Criterion wina:
        kept where |x| * c is above the threshold."""
        import numpy as np

        s = self.scales
        return np.stack([np.concatenate([over(torch.cat(h).float(), a, norms_of(s, 0, j, "cpu")).float().mean(0).numpy(),
                                         over(torch.cat(m).float(), b, norms_of(s, 1, j, "cpu")).float().mean(0).numpy()])
                         for j, (h, m, (a, b)) in enumerate(zip(self.inputs, self.mid_vectors, inputs))])


class ColumnNorms:
    """WINA's per-channel weight column norms of two inputs ([layers, channels] each, store.sparsity.SCALES), handed
    out per layer on the device asked, each copied there once."""

    def __init__(self, first, second):
        self.cpu = (torch.as_tensor(first, dtype=torch.float32), torch.as_tensor(second, dtype=torch.float32))
        self.on: dict = {}

    def get(self, k: int, layer: int, device) -> torch.Tensor:
        key = (k, str(device))
        if key not in self.on:
            self.on[key] = self.cpu[k].to(device)
        return self.on[key][layer]


def norms_of(scales: ColumnNorms | None, k: int, layer: int, device) -> torch.Tensor | None:
    """Input `k`'s column norms of `layer` on `device` (criterion wina), None without scales (magnitude)."""
    return None if scales is None else scales.get(k, layer, device)


def scaled(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """|x| * c in float32 (c [n] over x's last dimension): WINA's score of each entry."""
    return x.detach().abs().float() * c


def over(x: torch.Tensor, t: float, c: torch.Tensor | None = None) -> torch.Tensor:
    """The keep mask of a thresholded input: |x| > t (criterion magnitude, c None), or |x| * c > t (wina)."""
    return x.abs() > t if c is None else scaled(x, c) > t


def _rows(b: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if b is None else b.index_select(0, idx)


def paired_quantiles(firsts: list[list[torch.Tensor]], seconds: list[list[torch.Tensor]],
                     targets: Sequence[float]) -> dict[float, tuple[tuple[float, float], ...]]:
    """Per target: each layer's (quantile of its `firsts` samples, of its `seconds` samples) at that target, the
    thresholds of a pair of masks (0: (0, 0), keep every entry that is not exactly zero). Empty when some layer
    recorded nothing."""
    if not all(firsts) or not all(seconds):
        return {}
    qs = torch.tensor(sorted(targets), dtype=torch.float64)
    out: dict[float, list[tuple[float, float]]] = {float(t): [] for t in qs}
    for one, two in zip(firsts, seconds):
        a = torch.quantile(torch.cat(one).double(), qs).tolist()
        b = torch.quantile(torch.cat(two).double(), qs).tolist()
        for t, x, y in zip(qs.tolist(), a, b):
            out[t].append((0.0, 0.0) if t == 0 else (float(x), float(y)))
    return {t: tuple(v) for t, v in out.items()}


def for_job(config: ModelConfig, model_dir, target: float, *, field: str = "spec.offload.sparsity",
            hot_bytes: int = 0, window: int = WINDOW, gap: int | None = None, method: str = "auto",
            attention: bool | None = None, channel_window: int = CHANNEL_WINDOW,
            channel_hot_bytes: int | None = None) -> SparseFFN:
    """The sparse FFN a job asking for `target` runs with: OPT-style ReLU models use their own zeros (exact, no
    calibration); other activations need the model's calibration for `target` (store/sparsity.py refuses a
    missing or stale one, naming `field`). With the model's neuron bundles (kubeflash calibrate writes them) the
    up/down matrices of streamed layers are read per active neuron: a hot set of `hot_bytes` (the neurons most
    often active on the calibration text) stays resident, and a neuron stays `window` decode steps once read; runs
    of missing neurons at most `gap` inactive ones apart are read as one (None: costmodel.merge_gap's default).

    `method`: "input" thresholds the FFN's inputs (TEAL; needs a calibration with input thresholds; streamed
    layers read the kept columns from the input-channel files when the model has them), "gate" the gate
    activation (CATS, above), "auto" input where the model has input-channel files and input thresholds for
    `target` (kubeflash calibrate writes both), gate otherwise (docs/sparsity.md says why).

    With method "input" and input-channel files, `channel_hot_bytes` (None: `hot_bytes`) of the rows most often kept
    on the calibration text are held in host memory (channelcache.py) and a row read in a decode call stays
    `channel_window` calls of its kind.

    `attention` (method "input" only): True thresholds the attention's inputs too (attnsparse.py; needs a
    calibration with attention thresholds; streamed layers read q/k/v/o columns from the attention channel files
    when the model has them), False leaves the attention dense, None (auto) thresholds it where the model has
    attention channel files and attention thresholds for `target` (`kubeflash calibrate --attention` writes both).
    A run prices auto against FFN-only on the machine's ceilings and keeps the faster (price_attention); True is
    kept even where predicted slower, and the run line says so."""
    from ..store.bundles import DIR, BundleReader, frequency

    if getattr(config, "num_experts", 0):
        raise ValueError(f"{field}: a mixture-of-experts model reads only its routed experts already; activation "
                         "sparsity applies to dense FFN models (set it to off)")
    if config.hidden_act == "relu" and config.architecture == "opt":
        th, source = [0.0] * config.num_layers, "relu"
    else:
        th = thresholds_for_job(model_dir, target, config.num_layers, field)
        source = "calibrated"
        if method != "gate":
            ffn = _input_for_job(config, model_dir, target, th, field, method, gap, attention,
                                 hot_bytes=hot_bytes if channel_hot_bytes is None else channel_hot_bytes,
                                 window=channel_window)
            if ffn is not None:
                return ffn
    if attention:
        raise ValueError(f"{field}: attention sparsity thresholds the attention's inputs as input sparsity (TEAL) does "
                         "the FFN's; it needs the input method (a Llama-family model calibrated with input thresholds)")
    reader, hot = None, None
    if (Path(model_dir) / DIR).is_dir():
        reader = BundleReader(model_dir)  # refuses bundles of another version of the model
        freq = frequency(model_dir, target) if hot_bytes else None
        if freq is not None:
            from .neurons import hot_sets

            hot = hot_sets(freq, row_bytes=reader.row_bytes, budget_bytes=hot_bytes)
    if gap is None:
        from .costmodel import merge_gap

        gap = merge_gap(reader.row_bytes) if reader is not None else 0
    ffn = SparseFFN(th, num_layers=config.num_layers, target=target, source=source, bundles=reader, hot=hot,
                    window=window, gap=gap)
    if reader is not None and source == "calibrated":
        from ..store.bundles import GateRows
        from .predictor import load

        pred = load(Path(model_dir) / DIR, target)
        if pred is not None and pred.use.any():
            ffn.with_predictor(pred, GateRows(model_dir))
    return ffn


def _input_for_job(config: ModelConfig, model_dir, target: float, th, field: str, method: str,
                   gap: int | None, attention: bool | None = None, *, hot_bytes: int = 0,
                   window: int = 0) -> SparseFFN | None:
    """The input-sparse (TEAL) FFN of a job, or None where `method` is auto and the model lacks what it needs."""
    from ..store import channels
    from ..store.sparsity import CRITERIA, CalibrationError, input_thresholds_for, scales_for

    ins = input_thresholds_for(model_dir, target, num_layers=config.num_layers, field=field, criteria=CRITERIA)
    have = channels.present(model_dir)
    if method == "auto" and (ins is None or not have):
        return None
    if ins is None:
        raise CalibrationError(f"{field} {target:g}: the calibration in {model_dir} has no input thresholds (made "
                               f"before input sparsity); run `kubeflash calibrate {model_dir} --text FILE` again")
    reader = channels.ChannelReader(model_dir) if have else None
    freq = channels.frequency(model_dir, target) if have else None  # the job's one read of them (channel_freq)
    priced = None
    if reader is not None and (hot_bytes or window):
        from .channelcache import ChannelCache, hot_pricing, hot_rows

        rows = dict(hidden=reader.hidden, in_row_bytes=reader.in_row_bytes, down_row_bytes=reader.down_row_bytes)
        hot = None if freq is None or not hot_bytes else hot_rows(freq, **rows, budget_bytes=hot_bytes)
        priced = None if hot is None else hot_pricing(freq, hot, **rows)
        reader = ChannelCache(reader, hot=hot, window=window)
    scales = scales_for(model_dir, num_layers=config.num_layers)  # None: magnitude
    ffn = SparseFFN(th, num_layers=config.num_layers, target=target, source="calibrated", inputs=ins,
                    channels=reader, scales=scales)
    ffn.channel_hot, ffn.channel_freq = priced, freq
    if reader is not None:
        ffn.channel_gaps = channel_gaps(reader, gap)
    if attention is not False:
        ffn.attention = _attention_for_job(config, model_dir, target, field, gap, attention, scales)
        ffn.attention_asked = attention
    return ffn


def _attention_for_job(config: ModelConfig, model_dir, target: float, field: str, gap: int | None,
                       attention: bool | None, scales: dict | None = None):
    """The job's attnsparse.SparseAttention, or None where `attention` is None (auto) and the model lacks what it
    needs (attention thresholds for `target` and the attention channel files)."""
    from ..store import channels
    from ..store.sparsity import CRITERIA, CalibrationError, attention_thresholds_for
    from .attnsparse import SparseAttention

    ths = attention_thresholds_for(model_dir, target, num_layers=config.num_layers, field=field, criteria=CRITERIA)
    have = channels.attn_present(model_dir)
    if attention is None and (ths is None or not have):
        return None
    if ths is None:
        raise CalibrationError(f"{field} {target:g} with attention sparsity: the calibration in {model_dir} has no "
                               f"attention thresholds (made before attention sparsity); run `kubeflash calibrate "
                               f"{model_dir} --text FILE --attention` again")
    reader = channels.AttnChannelReader(model_dir) if have else None
    gaps = (0, 0) if reader is None else channel_gaps(reader, gap)
    return SparseAttention(ths, num_layers=config.num_layers, channels=reader, gaps=gaps, scales=scales)


def channel_gaps(reader, gap: int | None = None, **pricing) -> tuple[int, int]:
    """Input sparsity's merge gaps for a channel reader's two kinds of rows (input rows; down or o rows): `gap` for
    both where given, else costmodel.merge_gap's for each row size (`pricing`: its op_s and gbps, else assumed)."""
    from .costmodel import merge_gap

    if gap is not None:
        return gap, gap
    return merge_gap(reader.in_row_bytes, **pricing), merge_gap(reader.down_row_bytes, **pricing)


def hold_on_device(ffn: SparseFFN, *, device_bytes: int, host_bytes: int, device) -> bool:
    """Input sparsity's hot set in two tiers (channelcache.hot_tiers): its most frequent rows within `device_bytes`
    held on the compute device `device`, the next within `host_bytes` in host memory; the channel cache rebuilt with
    both (same reader and window; a bare channel reader wrapped; the rows the old cache's hot set holds taken from
    its memory, so no row is read from the SSD twice at start) and ffn.channel_gpu / channel_hot priced for them.
    False (nothing changed) without input-channel files, keep frequencies (ffn.channel_freq, as for_job loaded them)
    or room."""
    from .channelcache import ChannelCache, hot_pricing, hot_tiers

    c = ffn.channels
    freq = ffn.channel_freq if c is not None and ffn.method == "input" and device_bytes > 0 else None
    if freq is None:
        return False
    rows = dict(hidden=c.hidden, in_row_bytes=c.in_row_bytes, down_row_bytes=c.down_row_bytes)
    dev, host = hot_tiers(freq, **rows, budgets=(device_bytes, host_bytes))
    cached = isinstance(c, ChannelCache)
    ffn.channels = ChannelCache(c.reader if cached else c, hot=host, window=c.window if cached else 0,
                                window_bytes=c.window_bytes if cached else None, device_hot=dev, device=device,
                                previous=c if cached else None)  # its hot rows not read again
    ffn.channel_gpu, ffn.channel_hot = hot_pricing(freq, dev, **rows), hot_pricing(freq, host, **rows)
    return True


def hot_budget(resources, device: str) -> int:
    """Bytes of hot neuron bundles a job keeps resident: HOT_SHARE of its memory budget on the compute device
    (spec.resources.gpuMemory on a GPU, cpuMemory on the CPU); 0, no hot set, when the job sets none."""
    budget = resources.gpu_memory if str(device).startswith("cuda") else resources.cpu_memory
    return int(HOT_SHARE * budget) if budget else 0


def thresholds_for_job(model_dir, target: float, num_layers: int, field: str) -> tuple[float, ...]:
    from ..store.sparsity import thresholds_for

    return thresholds_for(model_dir, target, num_layers=num_layers, field=field)


# ----------------------------------------------------------------------------- teacher-forced passes


@torch.inference_mode()
def sequence_logits(engine, ids: Sequence[int]) -> torch.Tensor:
    """Logits [S, V] (float32) at every position of one sequence, in one prefill pass through the engine's own
    stages and layer function (sparse when the engine is): for perplexity and for calibration."""
    c, n = engine.config, len(engine.manifest.stages)
    batch = make_batch(torch.ones(1, len(ids), dtype=torch.long), 0, len(ids), engine.device)
    rope = engine.rope(batch.positions, engine.dtype) if engine.rope is not None else None
    x, logits = None, None
    for stage in range(n):  # every stage in order: the streamer reads them in that order
        w = engine.streamer.get(stage)
        if stage == 0:
            x = embed(c, w, torch.tensor([list(ids)], device=engine.device), batch.positions)
        elif stage == n - 1:
            if c.tie_word_embeddings:
                w = {**w, "lm_head": engine.streamer.resident[0]["tok_embed"]}
            logits = head(c, w, x[0])  # [S, V]
        else:
            x = engine.layer_fn(c, w, x, batch, LayerKV(None, None, in_place=False), rope, layer=stage - 1)
    return logits


def windows(ids: Sequence[int], size: int) -> list[list[int]]:
    """`ids` cut into consecutive windows of `size` tokens (the last may be shorter; none empty)."""
    return [list(ids[i:i + size]) for i in range(0, len(ids), size)]


def perplexity(engine, ids: Sequence[int], *, window: int = 512) -> tuple[float, torch.Tensor]:
    """(perplexity over `ids`, each window scored on its own; the argmax token at every scored position)."""
    nll, count, top = 0.0, 0, []
    for win in windows(ids, window):
        if len(win) < 2:
            continue
        logits = sequence_logits(engine, win)[:-1]  # [S-1, V] predicting win[1:]
        target = torch.tensor(win[1:])
        nll += float(F.cross_entropy(logits.float().cpu(), target, reduction="sum"))
        count += len(win) - 1
        top.append(logits.argmax(-1).cpu())
    return math.exp(nll / count), torch.cat(top)
