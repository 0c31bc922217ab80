"""A local model cache: converts a source once into `<root>/models/<model-id>` and reuses it afterwards.

Used by `kubeflash run` on one machine; the node agent stages into the same layout on each SSD.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from .format import Manifest, StoreError, load_manifest
from .ids import model_id

DEFAULT_ROOT = Path(os.environ.get("KUBEFLASH_HOME", Path.home() / ".cache" / "kubeflash"))


def fetch_url(url: str, dest: Path, *, progress=None) -> Path:
    """Download an http(s) source to `dest` (temp name, then rename), so a half download is never used."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        return dest
    tmp = dest.with_name(f".{dest.name}.part")
    with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0)
        done = 0
        while block := r.read(8 << 20):
            f.write(block)
            done += len(block)
            if progress:
                progress(done, total)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    return dest


def ensure_model(uri: str, *, dtype: str = "float16", quantization: str = "none", root: Path = DEFAULT_ROOT,
                 progress_bar: bool = True) -> tuple[Path, Manifest]:
    """Return (model_dir, manifest), converting the source into the cache first if it is not there.

    quantization (none | int8 | int4, the job's spec.model.quantization) is part of the model id.
    """
    from .convert import convert

    model_dir = Path(root) / "models" / model_id(uri, dtype=dtype, quantization=quantization)
    try:
        return model_dir, load_manifest(model_dir)
    except StoreError:
        if model_dir.exists() and (model_dir / "manifest.json").exists():
            raise  # a broken published model: say so rather than silently rebuilding over it
    src = uri
    if uri.startswith(("http://", "https://")):
        name = uri.rstrip("/").rsplit("/", 1)[-1] or "model.gguf"
        src = str(fetch_url(uri, Path(root) / "downloads" / f"{model_dir.name}-{Path(name).name}"))
    bar = _bar(f"converting {uri}", progress_bar)
    manifest = convert(src, model_dir, dtype=dtype, quantization=quantization,
                       progress=lambda n, total, stage: bar(n, total, stage))
    bar.close()
    return model_dir, manifest


class _bar:
    """A tqdm progress bar fed with (done, total, label), silent when disabled."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled, self.t = desc, enabled, None

    def __call__(self, n: int, total: int, label: str = "") -> None:
        if not self.enabled:
            return
        if self.t is None:
            from tqdm import tqdm

            self.t = tqdm(total=total, desc=self.desc, unit="stage")
        self.t.update(n - self.t.n)
        self.t.set_postfix_str(label)

    def close(self) -> None:
        if self.t is not None:
            self.t.close()
