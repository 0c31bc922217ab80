"""A calibration with WINA on the attention's inputs and magnitude on the FFN's ("hybrid" in docs/sparsity.md).

    .venv/bin/python docs/bench-results/wina-smollm2/make_hybrid.py MAGNITUDE_ENTRY WINA_ENTRY OUT_ENTRY

MAGNITUDE_ENTRY and WINA_ENTRY: store entries of the same model calibrated for the same targets with `kubeflash
calibrate ... --attention` and `... --attention --criterion wina`; OUT_ENTRY: a copy of MAGNITUDE_ENTRY (its channel
files and keep frequencies) whose sparsity.json is replaced: the FFN thresholds of the magnitude calibration with
column norms of 1 (|x| * 1 is the magnitude: tests/engine/test_sparse_wina.py checks the thresholds are bit for bit
the same), the attention thresholds and column norms of the WINA calibration.
"""

import sys
from dataclasses import replace

import numpy as np

from kubeflash_node.store import sparsity as cal

mag, wina = cal.load(sys.argv[1]), cal.load(sys.argv[2])
scales = {**wina.scales, "ffn_in": np.ones_like(wina.scales["ffn_in"]), "ffn_mid": np.ones_like(wina.scales["ffn_mid"])}
print(cal.save(sys.argv[3], replace(mag, criterion="wina", scales=scales, attention=wina.attention)))
