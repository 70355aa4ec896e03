"""Quality on the real MiniLM weights (issue 3, item 7): NF4 vs FP4 vs absmax int4, same blocksize.

Run with ``-s`` to see the table; ``python -m benchmarks.bench_quant`` prints the same one. On the
36 encoder Linear weights of all-MiniLM-L6-v2, blocksize 64, NF4/FP4 with double quantization:

* relative error (median of ``|w - w_hat| / |w|``): NF4 < FP4 < int4, the QLoRA paper's ordering;
* absolute error (mean and RMS of ``w - w_hat``): NF4 is best, but int4 beats bitsandbytes' FP4.
  FP4 (E2M1, bias 2) spends two of its 16 codes on +-0.0052 and steps by 1/6 to 1/3 near +-1, so
  it is finer than int4 for small weights (relative error) and coarser for large ones (absolute).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `benchmarks` sits next to `src`

from benchmarks.bench_quant import error_table, format_error_table  # noqa: E402


def test_nf4_is_best_and_relative_error_follows_the_qlora_ordering(minilm):
    table = error_table(minilm)
    print(f"\nMiniLM, {len(minilm)} Linear weights, blocksize 64\n{format_error_table(table)}")
    nf4, fp4, int4 = table["NF4"], table["FP4"], table["int4"]
    assert nf4["median_rel"] < fp4["median_rel"] < int4["median_rel"]
    for metric in ("mean_abs", "rms"):
        assert nf4[metric] < min(fp4[metric], int4[metric])
