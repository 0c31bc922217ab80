"""What the peer-benchmark runners share: the --gpu-memory budget, a cold page cache, the JSON result."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kubeflash_node.engine.bench import drop_page_cache as _drop_page_cache
from kubeflash_node.engine.cli_plan import parse_size as _parse_size


def parse_size(text: str) -> int:
    """`12GiB`, `12Gi`, `12G`, `500MiB`, `1073741824` -> bytes (kubeflash's own parser); an argparse type."""
    try:
        return _parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 12GiB, 12G or 500MiB") from None


def cap_gpu_memory(cap_bytes: int | None) -> int | None:
    """Limit this process's CUDA caching allocator on GPU 0 to `cap_bytes` (None: no cap). Call it before
    anything is allocated on the GPU. Returns the cap in bytes, or None."""
    import torch

    if cap_bytes is None:
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    if cap_bytes > total:
        raise SystemExit(f"--gpu-memory {cap_bytes / 2**30:.2f} GiB exceeds the GPU's {total / 2**30:.2f} GiB")
    torch.cuda.set_per_process_memory_fraction(cap_bytes / total, 0)
    return cap_bytes


def drop_page_cache(folder: Path) -> str:
    """Flush and drop the page cache as `kubeflash bench --cold` does (root: all of it; otherwise fadvise
    DONTNEED on every file under `folder`), so the next reads come from the disk. Returns "drop_caches" or
    "fadvise"."""
    return _drop_page_cache([p for p in Path(folder).rglob("*") if p.is_file()])


def write_result(path: Path, result: dict) -> None:
    """Write `result` as indented JSON (parent folders created) and print its one-line summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    peak = result["gpu_peak_bytes"]
    projected = " (projected)" if result.get("projected") else ""
    print(f"{result['system']} {result['model']}: {result['prompts']} prompts x {result['prompt_len']} tokens, "
          f"{result['gen_len']} generated each: {result['total_s']:.2f} s{projected}, "
          f"{result['tokens_per_s']:.3f} generated tokens/s, GPU peak "
          f"{'n/a' if peak is None else f'{peak / 2**30:.2f} GiB'} -> {path}")


def add_workload_args(p: argparse.ArgumentParser, *, gen_default: int) -> None:
    """The arguments every transformers-based peer runner shares: batch, lengths, GPU cap, device, cold, seed."""
    p.add_argument("--prompts", type=int, default=8, metavar="B", help="prompts generated together (default 8)")
    p.add_argument("--prompt-len", type=int, default=512, metavar="P", help="tokens per prompt (default 512)")
    p.add_argument("--gen-len", type=int, default=gen_default, metavar="G",
                   help=f"tokens generated per prompt (default {gen_default})")
    p.add_argument("--gpu-memory", type=parse_size, metavar="SIZE",
                   help="GPU memory the run may allocate, e.g. 12GiB (default: the whole GPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="execution device (default cuda; cpu for a local smoke test)")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache after the warm-up, before the timed run (root: drop_caches; "
                        "otherwise fadvise on the weights' files)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the weights and prompt ids (default 0)")


def check_workload(p: argparse.ArgumentParser, args: argparse.Namespace, *, positions: int, family: str) -> None:
    """Refuse what add_workload_args' values cannot run (exits with the parser's usage error): `positions` is what
    the model (`family`, for the message) can attend over."""
    import torch

    if min(args.prompts, args.prompt_len, args.gen_len) < 1:
        p.error("--prompts, --prompt-len and --gen-len must be at least 1")
    if args.prompt_len + args.gen_len > positions:
        p.error(f"--prompt-len + --gen-len = {args.prompt_len + args.gen_len} exceeds {family}'s {positions} positions")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --device cpu")
    if args.device == "cpu" and args.gpu_memory is not None:
        p.error("--gpu-memory needs --device cuda")


class _FirstTokenClock:
    """A logits processor that records when the first token's logits are ready (the end of the prefill)."""

    def __init__(self, sync):
        self.sync, self.at = sync, None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.sync()
            self.at = time.perf_counter()
        return scores


def timed_generate(model, input_ids, gen_len: int, sync):
    """Greedy generate of exactly `gen_len` tokens; returns (output ids, prefill seconds, total seconds)."""
    import warnings

    import torch
    from transformers import LogitsProcessorList

    # a streamed or dispatched model's first parameter is on the meta device (or swapped out), so generate warns
    # that the inputs are elsewhere
    warnings.filterwarnings("ignore", message=r"You are calling \.generate\(\) with the `input_ids` being on a device")
    clock = _FirstTokenClock(sync)
    sync()
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=gen_len,
                         min_new_tokens=gen_len, do_sample=False, logits_processor=LogitsProcessorList([clock]))
    sync()
    return out, clock.at - start, time.perf_counter() - start


def timed_run(model, vocab_size: int, args: argparse.Namespace, folder: Path, *, warmup: bool = True) -> dict:
    """The measured part every runner shares: --prompts random prompts of --prompt-len token ids (seeded by --seed),
    a 1-token warm-up on a short prompt (untimed), the page cache dropped with --cold, then one timed generate of
    --gen-len tokens. Returns the result fields it measured."""
    import torch

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(4, vocab_size, (args.prompts, args.prompt_len), generator=generator)
    input_ids = input_ids.to("cuda:0" if cuda else "cpu")
    if warmup:
        timed_generate(model, input_ids[:1, :8], 1, sync)
    page_cache = drop_page_cache(folder) if args.cold else "warm"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out, prefill_s, total_s = timed_generate(model, input_ids, args.gen_len, sync)
    generated = out[:, args.prompt_len:].numel()
    if generated != args.prompts * args.gen_len:
        raise SystemExit(f"generate returned {generated} new tokens, expected {args.prompts} x {args.gen_len}")
    return {"model": args.model, "device": "cuda:0" if cuda else "cpu", "prompts": args.prompts,
            "prompt_len": args.prompt_len, "gen_len": args.gen_len, "prefill_s": prefill_s,
            "decode_s": total_s - prefill_s, "total_s": total_s, "generated_tokens": generated,
            "tokens_per_s": generated / total_s, "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "page_cache": page_cache}
