"""The run report in FlexLLMGen's shape: per-layer/per-batch timings, latencies, throughput, memory, sizes."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

GB = 1 << 30


def build_report(engine) -> dict:
    """Collect the report of everything the engine has run so far."""
    t, s, m, c = engine.timings, engine.stats, engine.manifest, engine.config
    cuda = engine.device.type == "cuda"
    peak_gpu = torch.cuda.max_memory_allocated(engine.device) / GB if cuda else 0.0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB -> GiB
    total_s = s["prefill_s"] + s["decode_s"]
    report = {
        "model": m.source, "architecture": c.architecture, "family": c.family or c.architecture,
        "layers": c.num_layers, "dtype": m.dtype,
        "device": str(engine.device), "policy": engine.policy.__dict__ | {"placement": _placement(engine.placement)},
        "io_backend": engine.streamer.reader.name,
        "load_weight_per_layer_s": t.mean("load_weight"),
        "load_weight_stall_per_layer_s": t.mean("load_weight_stall"),
        "load_cache_prefill_per_batch_s": t.mean("load_cache_prefill"),
        "store_cache_prefill_per_batch_s": t.mean("store_cache_prefill"),
        "compute_layer_prefill_per_batch_s": t.mean("compute_layer_prefill"),
        "load_cache_decoding_per_batch_s": t.mean("load_cache_decode"),
        "store_cache_decoding_per_batch_s": t.mean("store_cache_decode"),
        "compute_layer_decoding_per_batch_s": t.mean("compute_layer_decode"),
        "weight_bytes_read": t.weight_bytes(),
        "prefill_weight_bytes": s["prefill_weight_bytes"], "decode_weight_bytes": s["decode_weight_bytes"],
        # a decode pass generates one token for every sequence of the block
        "decode_weight_bytes_per_pass": s["decode_weight_bytes"] / s["decode_passes"] if s["decode_passes"] else 0.0,
        "decode_weight_bytes_per_token": s["decode_weight_bytes"] / s["decode_tokens"] if s["decode_tokens"] else 0.0,
        "expert_reads": t.count["load_expert"], "expert_cache_hits": t.count["expert_cache_hit"],  # MoE only
        # MoE: mean distinct experts a routed layer read routed to, by (sequences, tokens of each): costmodel.RoutingProfile
        "routing_profile": [[seqs, per_seq, requests / layers]
                            for (seqs, per_seq), (requests, layers) in sorted(s.get("routing", {}).items())],
        "prefill_latency_s": s["prefill_s"], "prefill_tokens": s["prefill_tokens"],
        "prefill_throughput_tok_s": s["prefill_tokens"] / s["prefill_s"] if s["prefill_s"] else 0.0,
        "decode_latency_s": s["decode_s"], "decode_tokens": s["decode_tokens"],
        "decode_throughput_tok_s": s["decode_tokens"] / s["decode_s"] if s["decode_s"] else 0.0,
        "total_latency_s": total_s,
        "block_setup_s": s.get("block_setup_s", 0.0),  # KV allocation etc. before each block's prefill
        "generated_tokens": s["generated_tokens"],
        "peak_gpu_mem_gb": peak_gpu, "peak_host_rss_gb": peak_rss,
        "model_size_gb": m.total_bytes / GB, "cache_size_gb": s["cache_bytes"] / GB,
        "weights_in_flight_max_gb": (engine.policy.prefetch + 1) * max(f.size for f in m.files.values()) / GB,
    }
    report["total_throughput_tok_s"] = report["generated_tokens"] / total_s if total_s else 0.0
    prefetch = getattr(engine.streamer, "expert_prefetch", None)  # MoE: experts predicted and read during attention
    if prefetch is not None:
        report["expert_prefetch"] = prefetch.describe()
    if getattr(engine, "prefix_cache", None) is not None:  # hits, misses, blocks/bytes read/written/evicted, saved
        report["prefix_cache"] = engine.prefix_cache.report()
    return report


def _placement(p: list[str]) -> dict:
    return {k: p.count(k) for k in ("gpu", "cpu", "disk")}


def format_report(r: dict) -> str:
    """A text table like FlexLLMGen's benchmark printout."""
    rows = [
        ("model", f"{r['model']} ({r.get('family') or r['architecture']}, {r['layers']} layers, {r['dtype']})"),
        ("device / io backend", f"{r['device']} / {r['io_backend']}"),
        ("weights placement (stages)", ", ".join(f"{k}={v}" for k, v in r["policy"]["placement"].items())),
        ("load_weight (per-layer)", f"{r['load_weight_per_layer_s']:.6f} s  (stall {r['load_weight_stall_per_layer_s']:.6f} s)"),
        ("load_cache_prefill (per-batch)", f"{r['load_cache_prefill_per_batch_s']:.6f} s"),
        ("store_cache_prefill (per-batch)", f"{r['store_cache_prefill_per_batch_s']:.6f} s"),
        ("compute_layer_prefill (per-batch)", f"{r['compute_layer_prefill_per_batch_s']:.6f} s"),
        ("load_cache_decoding (per-batch)", f"{r['load_cache_decoding_per_batch_s']:.6f} s"),
        ("store_cache_decoding (per-batch)", f"{r['store_cache_decoding_per_batch_s']:.6f} s"),
        ("compute_layer_decoding (per-batch)", f"{r['compute_layer_decoding_per_batch_s']:.6f} s"),
        ("model size / cache size", f"{r['model_size_gb']:.3f} GB / {r['cache_size_gb']:.3f} GB"),
        ("peak gpu mem / peak host rss", f"{r['peak_gpu_mem_gb']:.3f} GB / {r['peak_host_rss_gb']:.3f} GB"),
        ("prefill latency / throughput", f"{r['prefill_latency_s']:.3f} s / {r['prefill_throughput_tok_s']:.3f} token/s"),
        ("decode latency / throughput", f"{r['decode_latency_s']:.3f} s / {r['decode_throughput_tok_s']:.3f} token/s"),
        ("total latency / throughput", f"{r['total_latency_s']:.3f} s / {r['total_throughput_tok_s']:.3f} token/s"),
        ("block setup (KV allocation)", f"{r['block_setup_s']:.3f} s"),
        ("weights read prefill / decode", f"{r['prefill_weight_bytes'] / GB:.3f} GB / {r['decode_weight_bytes'] / GB:.3f} GB"),
        ("decode weights read per pass / per token",
         f"{r['decode_weight_bytes_per_pass'] / GB:.3f} GB / {r['decode_weight_bytes_per_token'] / GB:.4f} GB"),
    ]
    ep = r.get("expert_prefetch")
    if ep:
        rows.append(("expert prefetch (hit rate / unused)", f"{ep['hit_rate']:.1%} of {ep['routed']} routed experts "
                     f"predicted / {ep['unused_reads']} reads, {ep['bytes_unused'] / GB:.3f} of "
                     f"{ep['bytes_prefetched'] / GB:.3f} GB prefetched unused"))
    pc = r.get("prefix_cache")
    if pc and pc["active"]:
        node = pc.get("node") or {}
        rows.append(("prefix cache (blocks hit / missed)", f"{pc['hits']} / {pc['misses']}  (saved "
                     f"{pc['prefill_tokens_saved']} prefill tokens; shared prefixes {pc['shared_prefixes']})"))
        if node:
            rows.append(("node prefix cache read / written / evicted",
                         f"{node['blocks_read']} / {node['blocks_written']} / {node['blocks_evicted']} blocks, "
                         f"{node['bytes_read'] / GB:.3f} / {node['bytes_written'] / GB:.3f} / "
                         f"{node['bytes_evicted'] / GB:.3f} GB"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def write_report(r: dict, path: Path) -> None:
    from ..store.format import atomic_write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(path), r)
