"""A local model cache: converts a source once into `<root>/models/<model-id>` and reuses it afterwards.

Used by `kubeflash run` on one machine; the node agent stages into the same layout on each SSD. A model is
handed out only verified (store.format.verify_model); each call first removes what killed runs left behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from .format import MANIFEST, Manifest, StoreError, verify_model
from .ids import model_id
from .scratch import STAGING, Scratch, clean_stale, entry_lock

DEFAULT_ROOT = Path(os.environ.get("KUBEFLASH_HOME", Path.home() / ".cache" / "kubeflash"))


def fetch_url(url: str, dest: Path, *, progress=None) -> Path:
    """Download an http(s) source to `dest` (in a locked scratch dir, then rename): a half download is never
    used, and one left by a killed run is removed by the next ensure_model.

    `kubeflash run` fetches with the user's own rights on the user's machine, so private addresses (a LAN
    mirror) are allowed; redirects are still checked hop by hop (never to link-local metadata addresses), the
    size is capped (store.fetch) and a `#sha256=<hex>` pin on the URL is verified."""
    import re

    from .fetch import FetchPolicy, download

    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        return dest
    base, _, frag = url.partition("#")
    pin = m.group(1) if (m := re.fullmatch(r"sha256=([0-9a-fA-F]{64})", frag)) else ""
    with Scratch(dest.parent, f"{STAGING}{dest.name}-") as scratch:
        tmp = scratch.path / "part"
        with open(tmp, "wb") as f:
            download(base, f, FetchPolicy(private_hosts=("*",)), sha256=pin, progress=progress)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    return dest


def ensure_model(uri: str, *, dtype: str = "float16", quantization: str = "none", root: Path = DEFAULT_ROOT,
                 progress_bar: bool = True) -> tuple[Path, Manifest]:
    """Return (model_dir, manifest) of a verified model, converting the source into the cache first if it is
    not there.

    quantization (none | int8 | int4, the job's spec.model.quantization) is part of the model id. Leftovers of
    killed runs (scratch dirs no live process holds) are removed first; concurrent calls for one model convert
    it once (a lock file per model). Every file is checked against its sha256 on first use (verify_model).
    """
    from .uris import check_scheme

    check_scheme(uri)  # s3://, ftp://, hf://…: named, not taken for a path
    models = Path(root) / "models"
    model_dir = models / model_id(uri, dtype=dtype, quantization=quantization)
    models.mkdir(parents=True, exist_ok=True)
    clean_stale(models)
    clean_stale(Path(root) / "downloads")
    with entry_lock(model_dir):  # the lock `kubeflash convert --out` this entry takes too
        if not (model_dir / MANIFEST).exists():
            _convert_into(uri, model_dir, root=Path(root), dtype=dtype, quantization=quantization,
                          progress_bar=progress_bar)
        try:
            return model_dir, verify_model(model_dir)  # a broken published model: an error naming the file
        except StoreError as e:  # and what brings the model back: this cache entry is only ever a conversion
            raise StoreError(f"{e}; the cached model {model_dir} is damaged: remove that directory and run again "
                             "to convert it anew") from None


def _convert_into(uri: str, model_dir: Path, *, root: Path, dtype: str, quantization: str,
                  progress_bar: bool) -> Manifest:
    from .convert import convert

    if model_dir.exists():  # a directory without a manifest is no model (none is published that way)
        raise StoreError(f"{model_dir}: exists but has no {MANIFEST}; remove it and run again")
    src = uri
    if uri.startswith(("http://", "https://")):
        name = uri.split("#", 1)[0].split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "model.gguf"
        src = str(fetch_url(uri, root / "downloads" / f"{model_dir.name}-{Path(name).name}"))
    from .fetch import redact

    bar = _bar(f"converting {redact(uri)}", progress_bar)
    manifest = convert(src, model_dir, dtype=dtype, quantization=quantization,
                       progress=lambda n, total, stage: bar(n, total, stage))
    bar.close()
    return manifest


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
