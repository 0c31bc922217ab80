"""Moved to store/tpshards.py (the node agent cuts shards too, and it may not import the engine); kept so
`python -m kubeflash_node.engine.tpshards` and older imports keep working."""

from ..store.tpshards import (  # noqa: F401
    check_shard,
    ensure_shards,
    main,
    manifest_sha256,
    merge_shards,
    shard_dirs,
    shard_store,
)

if __name__ == "__main__":
    raise SystemExit(main())
