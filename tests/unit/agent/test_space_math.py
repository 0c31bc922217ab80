"""Size estimates and free space: the estimate bounds the real store size; free honours capacity and KV."""

from kubeflash_node.agent.space import estimate_store_bytes, free_bytes
from kubeflash_node.store.modelconfig import ModelConfig, preset


def test_estimate_bounds_the_real_layout():
    """Every tensor padded to 4 KiB: the estimate is at least params*itemsize and within a few % of it."""
    cfg = preset("smollm2-135m")
    est = estimate_store_bytes(cfg, "float16")
    raw = cfg.total_params() * 2
    assert raw < est < raw * 1.05


def test_estimate_tiny_model_is_an_upper_bound():
    """For a tiny model (the test fixture's), padding dominates and must still be covered."""
    cfg = ModelConfig(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4)
    # the store of this model measured 249,856 bytes of stage files + a 4 KiB manifest
    assert estimate_store_bytes(cfg, "float16") >= 249_856 + 4096


def test_free_space():
    """A fake capacity caps free space; the reserve and unused KV quota are subtracted; never negative."""
    assert free_bytes(fs_free=1000) == 1000
    assert free_bytes(fs_free=1000, capacity=600, used=200) == 400
    assert free_bytes(fs_free=300, capacity=600, used=200) == 300
    assert free_bytes(fs_free=1000, reserve=100, kv_unused=250) == 650
    assert free_bytes(fs_free=100, reserve=300) == 0
