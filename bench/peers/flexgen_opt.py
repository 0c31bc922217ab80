#!/usr/bin/env python3
"""Peer benchmark: FlexGen (the `flexgen` 0.1.8 wheel) generating with OPT, one command, one JSON result.

    python bench/peers/flexgen_opt.py --json OUT.json --gpu-memory 12GiB [--cold] [--copy-threads N] \\
        [--max-seq-len N] -- \\
        --model facebook/opt-13b --path _DUMMY_ --offload-dir /root/fgoff --prompt-len 512 --gen-len 32 \\
        --percent 0 0 100 0 100 0 --gpu-batch-size 16 --num-gpu-batches 1 [--compress-weight] [--cut-gen-len 4]

Everything after `--` goes, unchanged, to FlexGen's own argument parser (`flex_opt.add_parser_arguments`), and
FlexGen's own `run_flexgen` runs the benchmark: a 1-token warm-up, then `gpu_batch_size * num_gpu_batches`
prompts of `--prompt-len` tokens generating `--gen-len` tokens each, timed by FlexGen per step (prefill = the
first step, decode = the rest). With `--cut-gen-len N` FlexGen runs N steps and projects the decode time to
`--gen-len` (the result then says "projected": true). `--path _DUMMY_` makes FlexGen fill its weights with ones at
start-up (not timed), on the GPU, the CPU or in --offload-dir as --percent says: the OPT shapes of FlexGen's
opt_config are those of `kubeflash convert dummy:opt-*`.

Kept comparable with `kubeflash bench` runs:
- shape: the same OPT presets (hidden/layers/heads; vocab 50272); prompt and generation lengths are FlexGen's flags;
- GPU memory: `--gpu-memory` caps this process's CUDA allocator (torch.cuda.set_per_process_memory_fraction)
  before FlexGen allocates anything; the peak FlexGen reports is torch.cuda.max_memory_allocated (warm-up
  included);
- host memory and page cache: run it inside the same cgroup as the kubeflash cold runs (bench/gpu-suite.sh `cg`),
  and pass `--cold` to drop the page cache before each FlexGen generate call (warm-up and benchmark), so the
  weights FlexGen just wrote, or the warm-up read, are not served from RAM. Mind FlexGen's host memory: each of
  its disk copy threads (4 by default) pins a 2 GiB relay buffer: 8 GiB in all, as much as that whole 8G cgroup;
  `--copy-threads N` sets their number (fewer threads, less disk parallelism: say so when reporting).

No hub access: run_flexgen loads the facebook/opt-30b tokenizer from the hub only to encode one fixed prompt,
so `flexgen.flex_opt.AutoTokenizer` is replaced by LocalOptTokenizer: the token ids are built locally. FlexGen's
results are taken from the arguments of its `write_benchmark_log` (wrapped, the log file is still written,
next to the JSON by default), not parsed back from the log.

Result JSON: system, version, args (FlexGen's argv), model, prompts, prompt_len, gen_len, prefill_s, decode_s,
total_s, generated_tokens, tokens_per_s (FlexGen's total throughput), decode_tokens_per_s, gpu_peak_bytes,
projected, gpu_memory_cap_bytes, page_cache, copy_threads (null: FlexGen's default).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import sys
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

from peer_common import cap_gpu_memory, drop_page_cache, parse_size, write_result

OPT_PAD_ID, OPT_BOS_ID = 1, 2
# OPT's GPT-2 BPE ids for FlexGen's only prompt. FlexGen's benchmark weights are dummy, so these ids only need the
# right count (BOS + 6 tokens) and the left padding; they are plausible ids, not checked against the real vocab.
PROMPT_IDS = {"Paris is the capital city of": [32826, 16, 5, 812, 343, 9]}
# write_benchmark_log(filename, *values): the names of `values`, in FlexGen 0.1.8's order.
LOG_FIELDS = ("model_size", "cache_size", "hidden_size", "gpu_peak_mem", "projected", "prefill_latency",
              "prefill_throughput", "decode_latency", "decode_throughput", "total_latency", "total_throughput")


class LocalOptTokenizer:
    """What run_flexgen needs of AutoTokenizer.from_pretrained("facebook/opt-30b", padding_side="left"):
    `tok(prompts, padding="max_length", max_length=N).input_ids` (left-padded with OPT's pad id to exactly N)
    and `batch_decode` (only called with real weights; without the vocabulary it spells the ids)."""

    @classmethod
    def from_pretrained(cls, name: str, **kwargs) -> LocalOptTokenizer:
        return cls()

    def __call__(self, prompts: list[str], padding: str = "max_length", max_length: int = 0) -> SimpleNamespace:
        if padding != "max_length":
            raise ValueError(f"LocalOptTokenizer pads to max_length only, not {padding!r}")
        rows = []
        for prompt in prompts:
            if prompt not in PROMPT_IDS:
                raise KeyError(f"LocalOptTokenizer knows FlexGen's benchmark prompt only, not {prompt!r}")
            ids = [OPT_BOS_ID] + PROMPT_IDS[prompt]
            if len(ids) > max_length:
                raise ValueError(f"prompt of {len(ids)} tokens does not fit max_length={max_length}")
            rows.append([OPT_PAD_ID] * (max_length - len(ids)) + ids)
        return SimpleNamespace(input_ids=rows)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        special = {OPT_PAD_ID, OPT_BOS_ID} if skip_special_tokens else set()
        return [" ".join(str(int(i)) for i in row if int(i) not in special) for row in sequences]


def import_flex_opt():
    """Import flexgen.flex_opt. flexgen.utils imports attrs (define, field, attr.setters.frozen) and never uses
    it; the GPU machine installs the wheel with --no-deps, so a stand-in module covers a missing attrs. The
    warnings silenced are FlexGen's use of APIs torch deprecates but still serves (TypedStorage, indexing with a
    list of slices)."""
    try:
        import attr  # noqa: F401
    except ImportError:
        attr, setters = types.ModuleType("attr"), types.ModuleType("attr.setters")
        attr.define = attr.field = setters.frozen = None
        attr.setters = setters
        sys.modules.update({"attr": attr, "attr.setters": setters})
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    try:
        import flexgen.flex_opt as fo
    except ImportError as e:
        raise SystemExit(f"cannot import flexgen ({e}): pip install --no-deps .whl/flexgen-0.1.8-py3-none-any.whl") from e
    return fo


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split at `--`: this runner's flags before, FlexGen's argv after."""
    p = argparse.ArgumentParser(
        description="Run FlexGen's benchmark (flexgen.flex_opt.run_flexgen) and write its result as JSON.",
        usage="%(prog)s --json OUT.json [--gpu-memory SIZE] [--cold] [--copy-threads N] [--max-seq-len N] -- "
              "FLEXGEN_ARGS...")
    p.add_argument("--json", type=Path, required=True, metavar="FILE", help="write the result to this JSON file")
    p.add_argument("--gpu-memory", type=parse_size, metavar="SIZE",
                   help="GPU memory FlexGen may allocate, e.g. 12GiB (default: the whole GPU)")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache before each FlexGen generate call (root: drop_caches; otherwise "
                        "fadvise on the --offload-dir files)")
    p.add_argument("--copy-threads", type=int, metavar="N",
                   help="FlexGen's disk copy threads, each pinning a 2 GiB host buffer (default: FlexGen's 4)")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="raise FlexGen's OPT max_seq_len (learned positions, default 2048) for long prompts, as "
                        "kubeflash's dummy:opt-*-32k presets do")
    cut = argv.index("--") if "--" in argv else len(argv)
    args, rest = p.parse_known_args(argv[:cut])
    if args.copy_threads is not None and args.copy_threads < 1:
        p.error("--copy-threads must be at least 1")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        p.error("--max-seq-len must be at least 1")
    if rest or cut == len(argv):
        p.error("FlexGen's arguments go after `--`, e.g. -- --model facebook/opt-13b --path _DUMMY_ ..."
                + (f" (not understood here: {' '.join(rest)})" if rest else ""))
    return args, argv[cut + 1:]


def parse_flexgen_args(fo, fg_argv: list[str], json_path: Path) -> argparse.Namespace:
    """FlexGen's own parser over `fg_argv`, plus the checks FlexGen would fail late or silently on."""
    p = argparse.ArgumentParser(prog="flexgen.flex_opt")
    fo.add_parser_arguments(p)
    fg = p.parse_args(fg_argv)
    if len(fg.percent) != 6:
        p.error(f"--percent takes 6 numbers (weights gpu cpu, cache gpu cpu, activations gpu cpu), got {fg.percent}")
    if fg.cut_gen_len is not None and not 4 <= fg.cut_gen_len <= fg.gen_len:
        # project_decode_latency averages the decode steps after 2 warm-up steps: it needs at least one more.
        p.error(f"--cut-gen-len {fg.cut_gen_len}: needs 4 <= N <= --gen-len ({fg.gen_len})")
    try:
        weights = Path(fg.path, fo.get_opt_config(fg.model).name + "-np").expanduser()
    except (ValueError, NotImplementedError) as e:  # an unknown name; opt-350m's other architecture
        p.error(f"--model {fg.model}: {e}")
    if fo.DUMMY_WEIGHT not in fg.path and not weights.is_dir():
        p.error(f"no FlexGen weights at {weights} and no hub here: pass --path {fo.DUMMY_WEIGHT}")
    max_seq_len = fo.get_opt_config(fg.model).max_seq_len
    if fg.prompt_len + fg.gen_len > max_seq_len:
        p.error(f"--prompt-len {fg.prompt_len} + --gen-len {fg.gen_len} exceeds the model's {max_seq_len} learned "
                f"positions: raise them with this runner's --max-seq-len (before `--`)")
    if fg.log_file == "auto":
        fg.log_file = str(json_path.with_suffix(".flexgen.log"))
    return fg


def raise_max_seq_len(fo, max_seq_len: int | None) -> None:
    """Make flex_opt's get_opt_config (the only one run_flexgen and OptLM consult) give `max_seq_len` positions:
    FlexGen sizes its position embedding (max_seq_len + 2 rows) from it."""
    if max_seq_len is None:
        return
    get = fo.get_opt_config
    fo.get_opt_config = lambda name, **kw: get(name, **{"max_seq_len": max_seq_len, **kw})


def install_patches(fo, cold_dir: str | None = None, copy_threads: int | None = None) -> dict:
    """Patch flexgen.flex_opt for this run: the local tokenizer, a write_benchmark_log that also records its
    arguments, (cold_dir set) a page-cache drop before each OptLM.generate, and (copy_threads set) that many disk
    copy threads. Returns the record: the LOG_FIELDS once FlexGen has logged, and "page_cache" (how it was
    dropped, or "warm")."""
    record = {"page_cache": "warm"}
    write_log = fo.write_benchmark_log

    def write_benchmark_log(filename, *values):
        record.update(zip(LOG_FIELDS, values, strict=True))
        return write_log(filename, *values)

    fo.AutoTokenizer = LocalOptTokenizer
    fo.write_benchmark_log = write_benchmark_log
    if cold_dir is not None:
        generate = fo.OptLM.generate

        def cold_generate(self, *args, **kwargs):
            record["page_cache"] = drop_page_cache(Path(cold_dir).expanduser())
            return generate(self, *args, **kwargs)

        fo.OptLM.generate = cold_generate
    if copy_threads is not None:
        fo.TorchDisk = functools.partial(fo.TorchDisk, num_copy_threads=copy_threads)
    return record


def build_result(fg: argparse.Namespace, record: dict, *, argv: list[str], version: str, cap_bytes: int | None,
                 copy_threads: int | None) -> dict:
    """The result JSON from FlexGen's parsed args and the recorded write_benchmark_log arguments."""
    prompts = fg.gpu_batch_size * fg.num_gpu_batches
    return {
        "system": "flexgen", "version": version, "args": argv, "model": fg.model,
        "prompts": prompts, "prompt_len": fg.prompt_len, "gen_len": fg.gen_len,
        "prefill_s": float(record["prefill_latency"]), "decode_s": float(record["decode_latency"]),
        "total_s": float(record["total_latency"]), "generated_tokens": prompts * fg.gen_len,
        "tokens_per_s": float(record["total_throughput"]), "decode_tokens_per_s": float(record["decode_throughput"]),
        "gpu_peak_bytes": int(record["gpu_peak_mem"]), "projected": bool(record["projected"]),
        "gpu_memory_cap_bytes": cap_bytes, "page_cache": record["page_cache"], "copy_threads": copy_threads,
    }


def main(argv: list[str] | None = None) -> dict:
    args, fg_argv = parse_args(sys.argv[1:] if argv is None else argv)
    fo = import_flex_opt()
    raise_max_seq_len(fo, args.max_seq_len)
    fg = parse_flexgen_args(fo, fg_argv, args.json)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: FlexGen runs on CUDA only")
    cap = cap_gpu_memory(args.gpu_memory)
    record = install_patches(fo, fg.offload_dir if args.cold else None, args.copy_threads)
    args.json.parent.mkdir(parents=True, exist_ok=True)  # FlexGen's log goes next to the JSON
    fo.run_flexgen(fg)
    if "total_latency" not in record:
        raise SystemExit("FlexGen finished without calling write_benchmark_log: no result to write")
    result = build_result(fg, record, argv=fg_argv, version=importlib.metadata.version("flexgen"), cap_bytes=cap,
                          copy_threads=args.copy_threads)
    write_result(args.json, result)
    return result


if __name__ == "__main__":
    main()
