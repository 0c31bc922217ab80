"""`kubeflash calibrate MODEL --text FILE`: activation-sparsity thresholds into the model's store entry.

Runs the model densely over the calibration text (windows of --window tokens, teacher forced), records the
magnitude of every FFN activation per layer, and writes, for each target sparsity, the per-layer threshold below
which that share of activations fell (`<model dir>/sparsity.json`, crash-safe), and the same for the FFN input and
the intermediate activation (input sparsity, TEAL: what a run uses where the input-channel files exist). A job
then runs sparse with `spec.offload.sparsity: 0.5` (one of the calibrated targets). The file names the model it
was made for; a model converted again is refused until it is calibrated again. OPT (ReLU) models need no
calibration: their own zeros are the sparsity.

MODEL is a model directory (kubeflash convert --out DIR) or a source as spec.model.uri takes it
(builtin:smollm2-135m, a Hugging Face directory, a .gguf file), converted into the local store first exactly as
`kubeflash run` does (float32 on CPU, --dtype on a GPU), so the run finds the calibration.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .allocate import ALLOCATIONS, EVAL_TOKENS, STEP
from .cliargs import int_range

MIN_TOKENS = 512  # fewer and the per-layer quantiles rest on too few tokens to mean anything
DEFAULT_TARGETS = tuple(round(0.05 * i, 2) for i in range(20))  # 0, 0.05, ..., 0.95


def targets(text: str) -> tuple[float, ...]:
    """Comma-separated target sparsities, each in [0, 0.95]."""
    from ..store.sparsity import MAX_TARGET

    out = []
    for part in text.split(","):
        try:
            t = float(part)
        except ValueError:
            t = float("nan")
        if not 0 <= t <= MAX_TARGET:
            raise argparse.ArgumentTypeError(f"each target sparsity must be a number in [0, {MAX_TARGET}], got "
                                             f"{part.strip()!r}")
        out.append(t)
    return tuple(sorted(set(out)))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model directory, or a source (builtin:smollm2-135m, HF directory, .gguf) "
                                 "looked up in / converted into the local store as kubeflash run does")
    p.add_argument("--text", type=Path, required=True,
                   help=f"calibration text: a UTF-8 file of ordinary prose, at least {MIN_TOKENS} tokens")
    p.add_argument("--sparsity", type=targets, default=DEFAULT_TARGETS, metavar="T[,T...]",
                   help="target sparsities to calibrate, each in [0, 0.95] (default: 0, 0.05, ..., 0.95)")
    p.add_argument("--window", type=int_range(16, 8192), default=512, help="tokens per forward pass (default 512)")
    p.add_argument("--max-tokens", type=int_range(MIN_TOKENS), default=16384,
                   help="use at most this many tokens of the text (default 16384)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available; default)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="with a source MODEL on a GPU: the store entry's dtype, as spec.model.dtype (default float16; "
                        "CPU runs use the float32 entry)")
    p.add_argument("--store", type=Path, help="local model store root (default: $KUBEFLASH_HOME or "
                                              "~/.cache/kubeflash)")
    p.add_argument("--bundle", action=argparse.BooleanOptionalAction, default=True,
                   help="write neuron-bundled FFN files (ffn_bundles/: each neuron's up row and down column side by "
                        "side, 2/3 of the FFN bytes again, plus each neuron's activation frequency per target): a "
                        "sparse `kubeflash run` then reads only the active neurons' bundles of streamed layers "
                        "(default on; --no-bundle: thresholds only, streamed layers are read whole)")
    p.add_argument("--channels", action=argparse.BooleanOptionalAction, default=True,
                   help="write input-channel FFN files (ffn_channels/: each input channel's gate and up column side "
                        "by side, then each neuron's down column; as many bytes as the FFN again): a sparse `kubeflash "
                        "run` of a Llama-family model then thresholds the FFN's inputs (TEAL) and reads only the kept "
                        "channels' columns, fewer bytes than the neuron bundles (docs/sparsity.md); default on; "
                        "--no-channels: the gate-activation method with neuron bundles")
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=False,
                   help="also write attention channel files (attn_channels/: each attention input channel's q, k and v "
                        "column side by side, then each o column; as many bytes as the attention again): a sparse "
                        "`kubeflash run` then thresholds the attention's inputs too and reads only the kept channels' "
                        "columns (fewer bytes, more accuracy lost: docs/sparsity.md); default off: attention read whole. "
                        "The attention thresholds are calibrated either way")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                   help="how each target is shared out over layers and inputs: uniform (every layer's FFN input and "
                        "intermediate, and attention input and output, at the target; default); greedy (TEAL's "
                        f"block-wise allocation: each layer at the target, its inputs raised {STEP:g} at a time where "
                        f"the layer's output error on the first {EVAL_TOKENS} calibration tokens grows least per weight "
                        "byte saved); greedy-global (the same steps competing over all layers, until the byte-weighted "
                        "mean is the target). Over the attention's inputs too with --attention; a few minutes more on "
                        "a CPU; on SmolLM2 both lose more accuracy than uniform (docs/sparsity.md)")
    p.add_argument("--criterion", choices=("magnitude", "wina"), default="magnitude",
                   help="what input sparsity's thresholds (FFN and, with --attention, attention inputs) compare: "
                        "magnitude (TEAL: keep entry i of a linear's input when |x_i| exceeds the layer's threshold; "
                        "default) or wina (WINA, weight-informed: when |x_i| times the norm of the weight columns x_i "
                        "multiplies does, over the concatenated gate|up and q|k|v columns where one input feeds "
                        "several matrices); each threshold the quantile of that score at the target, so the share of "
                        "entries dropped is the target either way. Not with --allocation greedy*; the gate method's "
                        "thresholds stay magnitudes. Measured on SmolLM2 in docs/sparsity.md")
    p.add_argument("--predictor-rank", type=int_range(0, 4096), default=256,
                   help="with --bundle: rank of each layer's low-rank activation predictor (Deja Vu-style, fitted on "
                        "the FFN inputs of up to 4,096 calibration tokens a layer), used by the layers where, on "
                        "calibration tokens it was not fitted on, it kept at least 97%% of the active neurons while "
                        "naming at most 85%% of all of them; 0: none (default 256, or the hidden size if smaller)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    try:
        _refuse_early(args)  # before torch is imported (seconds) and the model converted (minutes)
    except ValueError as e:
        print(f"kubeflash calibrate: error: {e}", file=sys.stderr)
        return 1
    from ..store.format import StoreError
    from .generate import EngineError

    try:
        path = calibrate_cli(args)
    except (StoreError, EngineError, ValueError, OSError) as e:
        from .cli_run import say

        print(f"kubeflash calibrate: error: {say(e)}", file=sys.stderr)
        return 1
    print(f"calibration: {path}" + (f" (criterion {args.criterion})" if args.criterion != "magnitude" else ""))
    return 0


def _refuse_early(args: argparse.Namespace) -> None:
    """A --text that is no regular file, not UTF-8 or shorter than calibration needs, a MODEL that does not exist, is
    no model or a dummy: model (no tokenizer), or a --store that is a file: ValueError naming it."""
    import re

    if getattr(args, "allocation", "uniform") != "uniform" and not getattr(args, "channels", True):
        raise ValueError(f"--allocation {args.allocation} with --no-channels: greedy allocation shares out input sparsity's "
                         "thresholds, which a run uses only with the input-channel files; drop --no-channels")
    if getattr(args, "criterion", "magnitude") != "magnitude" and getattr(args, "allocation", "uniform") != "uniform":
        raise ValueError(f"--criterion {args.criterion} with --allocation {args.allocation}: greedy allocation measures "
                         "its levels as magnitudes; use --allocation uniform with --criterion wina")
    if getattr(args, "attention", False) and not getattr(args, "channels", True):
        raise ValueError("--attention with --no-channels: attention sparsity runs with the FFN's input sparsity, which "
                         "reads the input-channel files; drop --no-channels")
    if not args.text.is_file():
        why = "is a directory" if args.text.is_dir() else "is not a regular file" if args.text.exists() else \
            "no such file"
        raise ValueError(f"--text {args.text}: {why}; expected a UTF-8 text file of ordinary prose")
    model = str(args.model)
    if model.startswith("dummy:"):  # it would be converted first, minutes for a large preset, to be refused after
        raise ValueError(f"MODEL {model}: random weights have no tokenizer, so they cannot read --text; expected "
                         "builtin:smollm2-135m, a Hugging Face directory or .gguf file with a tokenizer, or a model "
                         "directory converted from one")
    if not model.startswith(("builtin:", "dummy:")) and not re.match(r"^[a-z][a-z0-9+.-]*://", model) \
            and not Path(model).expanduser().exists():
        raise ValueError(f"MODEL {model}: no such file or directory; expected a model directory (kubeflash convert "
                         "--out DIR), builtin:smollm2-135m, a Hugging Face directory or a .gguf file")
    from kubeflash_api import SpecError

    from .cli_run import _check_source

    try:  # an unknown builtin, a corrupt GGUF, a folder or file that is no model: not after torch and the store
        _check_source(model, field=f"MODEL {model}")
    except SpecError as e:
        raise ValueError(str(e)) from None
    if args.store and args.store.exists() and not args.store.is_dir():
        raise ValueError(f"--store {args.store}: is a file; expected the model store's directory")
    data = args.text.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {args.text}: not UTF-8 text ({e})") from None
    if len(data) + 2 < MIN_TOKENS:  # no tokenizer makes more tokens than bytes, besides a BOS and an EOS it adds
        raise ValueError(f"--text {args.text}: {len(data)} bytes; calibration needs at least {MIN_TOKENS} tokens "
                         "(a few pages of ordinary prose)")


def calibrate_cli(args: argparse.Namespace) -> Path:
    from ..store.format import StoreError, load_manifest
    from .cli_run import resolve_device

    _refuse_early(args)  # before the model is converted (minutes)
    device = resolve_device(args.device)
    model_dir = Path(args.model)
    if not (model_dir / "manifest.json").is_file():  # a source (a Hugging Face directory too): its store entry
        from ..store.cache import DEFAULT_ROOT, ensure_model

        model_dir, _ = ensure_model(args.model, dtype="float32" if device == "cpu" else args.dtype,
                                    root=args.store or DEFAULT_ROOT, progress_bar=not args.quiet)
    manifest = load_manifest(model_dir)
    if not manifest.tokenizer:
        raise StoreError(f"MODEL {args.model}: has no tokenizer (a dummy: model, or a directory saved without "
                         "tokenizer.json, tokenizer.model or vocab.json), so it cannot read --text")
    try:
        text = args.text.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {args.text}: not UTF-8 text ({e})") from None
    from .prompts import load_tokenizer

    ids = load_tokenizer(model_dir, manifest)(text)["input_ids"][:args.max_tokens]
    if len(ids) < MIN_TOKENS:
        raise ValueError(f"--text {args.text}: {len(ids)} tokens, calibration needs at least {MIN_TOKENS} "
                         "(a few pages of ordinary prose)")
    path, rec = calibrate(model_dir, ids, args.sparsity, device=device, window=args.window,
                          progress=not args.quiet, text_sha256=_sha256(args.text), recorder=True,
                          allocation=args.allocation, attention=args.attention,
                          criterion=getattr(args, "criterion", "magnitude"))
    if args.channels and manifest.config.get("architecture", "llama") != "opt":
        from ..store import sparsity as cal
        from ..store.channels import write_channels

        ins = cal.load(model_dir).inputs  # as written: greedy allocation's per-layer thresholds too
        print(f"input-channel files: {write_channels(model_dir, {t: rec.input_frequency_at(v) for t, v in ins.items()})}")
        if args.attention:
            from ..store.channels import write_attn_channels

            print(f"attention channel files: {write_attn_channels(model_dir)}")
    if args.bundle:
        from ..store.bundles import write_bundles

        th = _thresholds(path)
        out = write_bundles(model_dir, {t: rec.frequency_at(v) for t, v in th.items()})
        print(f"neuron bundles: {out}")
        if args.predictor_rank:
            for t, v in th.items():
                p = fit_predictor(model_dir, rec, v, rank=args.predictor_rank, target=t)
                print(f"predictor {t:g}: used in {int(p.use.sum())} of {len(p.use)} layers (held-out recall "
                      f"{100 * float(p.recall.mean()):.1f}%, predicted {100 * float(p.share.mean()):.1f}% of neurons "
                      "a token, layer means)")
    return path


def _thresholds(path: Path) -> dict:
    from ..store import sparsity as cal

    return cal.load(path.parent).thresholds


def fit_predictor(model_dir: Path, rec, thresholds, *, rank: int, target: float, recall: float | None = None):
    """Fit and save the target's low-rank predictors from the recorded FFN inputs and the gate matrices."""
    import torch

    from ..store.bundles import DIR
    from ..store.format import load_manifest
    from ..store.modelconfig import ModelConfig
    from . import predictor
    from .model import ACTIVATIONS

    config = ModelConfig.from_dict(load_manifest(model_dir).config)
    inputs = [torch.cat(v) for v in rec.inputs]
    p = predictor.fit(inputs, gate_matrices(model_dir), thresholds, ACTIVATIONS[config.hidden_act], rank=rank,
                      recall=predictor.RECALL if recall is None else recall)
    predictor.save(Path(model_dir) / DIR, target, p)
    return p


def gate_matrices(model_dir: Path) -> list:
    """Each decoder layer's gate matrix [I, H] as float32 numpy (a view of the stage file where it is float32)."""
    import numpy as np

    from ..store.format import load_manifest, tensor_view

    m = load_manifest(model_dir)
    gates = []
    for stage in (s for s in m.stages if s.startswith("layer_")):
        buf = np.memmap(Path(model_dir) / stage, dtype=np.uint8, mode="r")
        g = tensor_view(buf, m.files[stage].tensors["w_gate"])
        gates.append((g.astype(np.uint32) << 16).view(np.float32) if g.dtype == np.uint16  # bfloat16 bits
                     else np.asarray(g, dtype=np.float32))
    return gates


def column_norms(model_dir: Path) -> dict:
    """WINA's c for every decoder layer (store.sparsity.SCALES keys, [L, channels] float32 numpy each): per input
    channel the L2 norm of the weight columns it multiplies; where one input feeds several matrices (q, k, v; gate,
    up) the norm of its column of them stacked, sqrt(sum of the squared column norms), as one kept set serves all."""
    import numpy as np

    from ..store.format import load_manifest, tensor_view

    m = load_manifest(model_dir)
    groups = {"attn_in": ("wq", "wk", "wv"), "attn_out": ("wo",), "ffn_in": ("w_gate", "w_up"), "ffn_mid": ("w_down",)}
    out: dict = {k: [] for k in groups}
    for stage in (s for s in m.stages if s.startswith("layer_")):
        buf, t = np.memmap(Path(model_dir) / stage, dtype=np.uint8, mode="r"), m.files[stage].tensors
        for k, names in groups.items():
            sq = 0.0
            for n in names:
                if n not in t or t[n].dtype not in ("float16", "bfloat16", "float32"):
                    raise ValueError(f"--criterion wina: MODEL {model_dir} has no {t[n].dtype + ' ' if n in t else ''}"
                                     f"{n} matrix of floats in {stage} (fused or quantized weights); expected a "
                                     "Llama-family float16/bfloat16/float32 store")
                w = tensor_view(buf, t[n])
                w = (w.astype(np.uint32) << 16).view(np.float32) if w.dtype == np.uint16 else w  # bfloat16 bits
                sq = sq + np.square(w, dtype=np.float64).sum(0)  # [in] squared column norms
            out[k].append(np.sqrt(sq).astype(np.float32))
    return {k: np.stack(v) for k, v in out.items()}


def calibrate(model_dir: Path, ids: list[int], targets: tuple[float, ...], *, device: str = "cpu",
              window: int = 512, progress: bool = False, text_sha256: str = "", recorder: bool = False,
              write: bool = True, allocation: str = "uniform", attention: bool = False, criterion: str = "magnitude"):
    """Record FFN activations over `ids` and write the thresholds of `targets` into the model's store entry
    (`allocation` "greedy": the input-sparsity thresholds per layer and input by allocate.py, over the FFN's inputs,
    and the attention's too with `attention`; "uniform": every layer and input at the target);
    returns (the file, target -> [L, I] per-neuron activation frequency at that target's thresholds), or with
    `recorder` (the file, the sparse.SparseFFN recorder holding the samples). `write` False: nothing written, the
    store.sparsity.Calibration in place of the file (the caller saves it last: autocalib.py). `criterion` "wina": the
    input and attention thresholds are quantiles of |x| * c (column_norms), recorded with the calibration."""
    from ..store import sparsity as cal
    from ..store.format import load_manifest
    from ..store.modelconfig import ModelConfig
    from .generate import Engine
    from .policy import make_policy
    from .sparse import SparseFFN, sequence_logits, windows

    model_dir = Path(model_dir)
    digest = cal.manifest_sha256(model_dir)  # before the run: a model converted again meanwhile is not mixed in
    config = ModelConfig.from_dict(load_manifest(model_dir).config)
    if getattr(config, "num_experts", 0):
        raise ValueError(f"MODEL {model_dir}: a mixture-of-experts model; activation sparsity applies to dense FFNs")
    scales = None
    if criterion != "magnitude":
        if config.architecture == "opt" or allocation != "uniform":
            raise ValueError(f"--criterion {criterion}: needs a Llama-family model (gated FFN) and --allocation uniform")
        scales = column_norms(model_dir)
    rec = SparseFFN.recorder(config.num_layers, scales=scales)
    engine = Engine(model_dir, policy=make_policy(gpu_batch_size=1), device=device, sparsity=rec)
    parts = windows(ids, window)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), desc="calibrating", unit="tok")
    try:
        for part in parts:
            sequence_logits(engine, part)
            if bar:
                bar.update(len(part))
    finally:
        engine.close()
        if bar:
            bar.close()
    thresholds = rec.thresholds_at(targets)
    inputs, attn, levels = rec.input_thresholds_at(targets), rec.attention.thresholds_at(targets), {}
    if allocation != "uniform":
        if not inputs:
            raise ValueError(f"--allocation {allocation}: MODEL {model_dir} has no gated FFN (OPT: ReLU sparsity needs no "
                             "thresholds); expected a Llama-family model")
        from .allocate import EVAL_TOKENS, greedy, measure

        errors = measure(model_dir, rec, ids[:EVAL_TOKENS], device=device, attention=attention)
        inputs, attn, levels = greedy(rec, errors, config, targets, attention=attention,
                                      per_layer=allocation == "greedy")
    made = cal.Calibration(model_id=model_dir.name, manifest_sha256=digest, tokens=len(ids), text_sha256=text_sha256,
                           thresholds=thresholds, inputs=inputs, attention=attn, allocation=allocation, levels=levels,
                           criterion=criterion, scales=scales or {})
    path = cal.save(model_dir, made) if write else made
    return (path, rec) if recorder else (path, {t: rec.frequency_at(th) for t, th in thresholds.items()})


def _sha256(path: Path) -> str:
    from ..store.format import sha256_file

    return sha256_file(path)
