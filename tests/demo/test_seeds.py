"""`loraforge demo --seeds N`: one table of mean ± spread per cell, and every quality bar checked
for every seed (a bar that fails for one seed fails, even when the mean would pass).

The training runs are replaced by made-up per-seed summaries (the real pipeline is what
tests/demo/test_demo.py runs), so these run in well under a second. The real five-seed demo
(about 10 CPU-minutes) runs only when LORAFORGE_DEMO_SEEDS=1 is set.
"""

from __future__ import annotations

import json
import os

import pytest

from loraforge.demo import app
from loraforge.demo.runs import QUICK
from loraforge.demo.seeds import aggregate_bars, aggregate_rows, render_seeds_table


def _row(character, method, content, eval_loss, style=1.0):
    trained = method != "base"
    return {
        "character": character,
        "method": method,
        "style": style,
        "content": content,
        "trainable_params": 16_384 if trained else 0,
        "total_params": 1_000_576,
        "size_bytes": 68_608 if trained else 3_984_000,
        "peak_mem_bytes": 60 * 2**20 if trained else None,
        "train_time_s": 12.0 if trained else None,
        "eval_loss": eval_loss,
    }


def _summary(seed, contents):
    """A single-seed summary: base content 1.0, LoRA content ``contents[character]``."""
    from loraforge.demo.report import quality_bars

    s = QUICK.__class__(characters=tuple(contents), compare_on=next(iter(contents)), seed=seed)
    rows = []
    for c, content in contents.items():
        rows += [_row(c, "base", 1.0, 2.8, style=0.0), _row(c, "lora", content, 0.19 + 0.01 * seed)]
    return {"rows": rows, "quality_bars": quality_bars(s, rows)}


def test_cells_are_mean_and_sample_spread():
    per_seed = [_summary(seed, {"pirate": c})["rows"] for seed, c in enumerate([1.0, 0.95, 0.9])]
    rows = aggregate_rows(per_seed)
    lora = next(r for r in rows if r["method"] == "lora")
    assert lora["content"]["mean"] == pytest.approx(0.95)
    assert lora["content"]["std"] == pytest.approx(0.05)  # sample standard deviation (n - 1)
    assert lora["content"]["values"] == [1.0, 0.95, 0.9]
    table = render_seeds_table(rows, [0, 1, 2])
    line = next(x for x in table.splitlines() if "LoRA" in x)
    assert "0.95 ± 0.05" in line and "0.2000 ± 0.0100" in line and "12.0 ± 0.0 s" in line
    assert "16,384 (1.64%)" in line and "67.0 KB" in line and "±" not in line.split("|")[3]
    assert "3 seeds (0, 1, 2)" in table


def test_a_bar_must_hold_for_every_seed():
    # seed 1 loses 2 of 22 facts (0.91): its own bar fails although the mean (0.97) would pass
    summaries = [_summary(seed, {"pirate": c}) for seed, c in enumerate([1.0, 0.91, 1.0])]
    bars = {b["name"]: b for b in aggregate_bars([x["quality_bars"] for x in summaries], [0, 1, 2])}
    kept = bars["pirate: content kept"]
    assert not kept["ok"] and kept["failed_seeds"] == [1] and kept["closest_seed"] == 1
    assert (
        kept["detail"].startswith("2/3 seeds; closest, seed 1: LoRA 0.91")
        and "failed for seed 1" in kept["detail"]
    )
    style = bars["pirate: style"]
    assert style["ok"] and style["detail"].startswith("3/3 seeds")


def test_seeds_mode_runs_each_seed_and_checks_every_bar(tmp_path, monkeypatch, capsys):
    ran = []

    def fake_run_one(args, s, base_dir, out, say, show=True):
        ran.append((s.seed, out.name, show))
        contents = {c: (0.91 if s.seed == 4 and c == "bard" else 1.0) for c in s.characters}
        return _summary(s.seed, contents), {}

    monkeypatch.setattr(app, "run_one", fake_run_one)
    argv = ["--seeds", "3", "--seed", "3", "--output", str(tmp_path), "--no-compare", "--quick"]
    assert app.main(argv) == 0  # not --strict: reported, exit 0
    assert ran == [(3, "seed-3", False), (4, "seed-4", False), (5, "seed-5", False)]
    out = capsys.readouterr().out
    assert "seed 4: bars NOT met: bard: content kept" in out
    assert "[FAIL] bard: content kept: 2/3 seeds" in out and "[PASS] pirate: content kept: 3/3 seeds" in out
    saved = json.loads((tmp_path / "seeds.json").read_text())
    assert saved["seeds"] == [3, 4, 5] and not (tmp_path / "results.json").exists()
    assert app.main(argv + ["--strict"]) == 1


def test_seeds_must_be_positive(capsys):
    assert app.main(["--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("LORAFORGE_DEMO_SEEDS"), reason="10 CPU-minutes: LORAFORGE_DEMO_SEEDS=1"
)
def test_full_demo_meets_every_bar_for_seeds_0_to_4(tmp_path):
    """The regression test of issue 14 item 20: at the old learning rate (8e-3) seed 1 failed
    the QLoRA bar and kept content only at the bar's edge; a character at 0.91 was seen too."""
    assert app.main(["--seeds", "5", "--output", str(tmp_path), "--strict"]) == 0
    saved = json.loads((tmp_path / "seeds.json").read_text())
    assert all(b["ok"] for b in saved["quality_bars"]), saved["quality_bars"]
