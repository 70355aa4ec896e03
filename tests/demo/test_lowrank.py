"""``loraforge lowrank``: the demo's pirate runs extracted, resized and compared by φ.

One shortened run (6 steps per training run, a subset of the ranks) is shared by the module; the
checks are the invariants that hold whatever the training reached: an extraction of all of ΔW is
the fine-tune's linear part, a resize at the adapter's own rank is the adapter, φ of an adapter
with itself is 1, the random baseline sits at its expectation max(i, j)/n.
"""

from __future__ import annotations

import json

import pytest
import torch

from loraforge.demo import lowrank
from loraforge.demo import lowrank_report as rep

ARGS = ["--quick", "--steps", "6", "--ranks", "4", "--resize-ranks", "4,1", "--baseline-draws", "100",
        "--eval-facts", "6"]  # fmt: skip
TYPES = {"v_proj", "o_proj", "down_proj"}  # the demo LoRA's target modules


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("lowrank") / "run"
    assert lowrank.main([*ARGS, "--output", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_have_every_part(quick):
    out, res = quick
    assert set(res["models"]) == {"base", "full", "lora", "lora-r16", "lora-seed", "full-linear"}
    labels = [e["label"] for e in res["extraction"]]
    assert labels == ["r=4", "energy 0.9", "r=4 on the LoRA's modules", "energy 1 (all of ΔW)",
                      "energy 1 + other changes"]  # fmt: skip
    for e in res["extraction"]:
        assert {"eval_loss", "style", "content", "params", "energy_kept", "rank_min", "rank_max"} <= set(e)
    by = {e["label"]: e for e in res["extraction"]}
    # the LoRA's budget: rank 4 on its three modules of 4 blocks, as many parameters as the trained one
    assert by["r=4 on the LoRA's modules"]["params"] == res["runs"]["lora"]["trainable_params"] == 16384
    assert by["r=4"]["rank_max"] == 4 and by["r=4"]["energy_kept"] < by["energy 0.9"]["energy_kept"]
    assert by["energy 0.9"]["energy_kept"] >= 0.9
    # resize: ranks up to the adapter's own, its own first
    assert [r["rank"] for r in res["resize"]["lora"]] == [4, 1]
    assert [r["rank"] for r in res["resize"]["lora-r16"]] == [16, 4, 1]
    assert [r["params"] for r in res["resize"]["lora-r16"]] == [65536, 16384, 4096]
    for key in ("r4_vs_r16", "seeds"):
        pair = res["similarity"][key]
        assert set(pair["layers"]) == TYPES
        for lay in pair["layers"].values():
            assert lay["blocks"] == 4 and len(lay["per_direction"]) == 4
            assert all(0 <= x <= 1 + 1e-9 for row in lay["phi"] for x in row)
        assert (out / f"phi_{key}.png").stat().st_size > 10_000
    assert len(res["similarity"]["r4_vs_r16"]["layers"]["v_proj"]["phi"][0]) == 16  # (4, 16) grids
    text = (out / "lowrank.md").read_text()
    assert "extracted energy 0.9" in text and "lora-r16 |       r=16" in text
    assert res["reading"] in text and "The LoRA paper's finding" in res["reading"]
    assert f"{res['models']['full']['eval_loss']:.3f}" in res["reading"]  # computed, not canned


def test_measures_are_the_trainers_loss(quick):
    _, res = quick
    for name in ("full", "lora", "lora-r16", "lora-seed"):
        m = res["models"][name]
        assert m["eval_loss"] == pytest.approx(m["trained_eval_loss"], rel=1e-4), name


def test_all_of_delta_w_is_the_fine_tunes_linear_part(quick):
    _, res = quick
    whole = next(e for e in res["extraction"] if e["request"] == {"energy": 1.0})
    assert whole["energy_kept"] == pytest.approx(1.0, abs=1e-9)
    assert whole["rank_max"] == 128  # every update of the 128-wide model is full rank numerically
    assert whole["eval_loss"] == pytest.approx(res["models"]["full-linear"]["eval_loss"], rel=1e-4)
    # with the changed norms and embeddings saved, and the output head the base ties to the
    # embeddings: the full fine-tune itself
    saved = next(e for e in res["extraction"] if "modules_to_save" in e["request"])
    assert {"lm_head", "model.embed_tokens", "model.norm"} <= set(saved["request"]["modules_to_save"])
    assert saved["eval_loss"] == pytest.approx(res["models"]["full"]["eval_loss"], rel=1e-4)
    assert saved["eval_loss"] < whole["eval_loss"] * 0.999  # (the other changes do matter)
    # and a rank-4 truncation of it is measurably worse: the checks above can fail
    r4 = next(e for e in res["extraction"] if e["request"] == {"rank": 4})
    assert r4["eval_loss"] > whole["eval_loss"] * 1.001


def test_resize_at_own_rank_is_the_adapter(quick):
    _, res = quick
    for name in ("lora", "lora-r16"):
        own = res["resize"][name][0]
        assert own["energy_kept"] == pytest.approx(1.0, abs=1e-9)
        assert own["eval_loss"] == pytest.approx(res["models"][name]["eval_loss"], abs=1e-5)
        assert res["resize"][name][-1]["energy_kept"] < 1 - 1e-3  # r=1 drops something


def test_phi_of_an_adapter_with_itself_is_one(quick, tmp_path):
    out, res = quick
    adapter = res["runs"]["lora"]["weights"]
    grids = lowrank.similarity(adapter, adapter, tmp_path / "self")
    summary = rep.summarize_pair(grids, adapter, draws=2, seed=0)["layers"]
    for lay in summary.values():
        phi = torch.tensor(lay["phi"], dtype=torch.float64)
        assert torch.allclose(phi, torch.ones_like(phi), atol=1e-9) and phi.shape == (4, 4)
        assert lay["per_direction"] == pytest.approx([1.0] * 4, abs=1e-9)


def test_random_baseline_sits_at_its_expectation(quick):
    _, res = quick
    for pair in res["similarity"].values():
        for lay in pair["layers"].values():
            rnd, exp = torch.tensor(lay["random"]["phi"]), torch.tensor(lay["expected"]["phi"])
            # E φ(i, j) = max(i, j)/n. φ·min(i, j) sums i·j squared cosines of variance ~2/n² each:
            # sd(φ) ~ sqrt(2ij)/(n·min(i, j)); over 100 draws every cell within 4 standard errors
            i = torch.arange(1, rnd.shape[0] + 1.0)[:, None]
            j = torch.arange(1, rnd.shape[1] + 1.0)[None, :]
            se = (2 * i * j).sqrt() / (lay["n"] * torch.minimum(i, j)) / 100**0.5
            assert ((rnd - exp).abs() < 4 * se).all()
            assert lay["random"]["mean"] == pytest.approx(lay["expected"]["mean"], rel=0.15)


def test_random_grid_expectation_many_draws():
    n = 24
    g = rep.random_grid(2, 6, n, draws=400, seed=1)
    assert torch.allclose(g, rep.expected_grid(2, 6, n), atol=0.02)
    d = rep.stats(g)["per_direction"]  # each direction of a lies r_b / n inside b's span
    assert d == pytest.approx([6 / n, 6 / n], abs=0.03)


def test_stats_per_direction_from_a_hand_grid():
    # a's direction 1 inside b's 2-dim span: 1; direction 2 orthogonal to it: 0
    va = torch.eye(5, dtype=torch.float64)[:, :2]
    vb = torch.eye(5, dtype=torch.float64)[:, [0, 2]]
    from loraforge.lowrank.spectra import subspace_similarity

    s = rep.stats(subspace_similarity(va, vb))
    assert s["phi_11"] == 1.0 and s["per_direction"] == pytest.approx([1.0, 0.0]) and s["phi_all"] == 0.5


def test_quality_lost_at_the_first_cut():
    ref = {"eval_loss": 1.0, "style": 1.0}
    res = [{"rank": 16, "eval_loss": 1.0, "style": 1.0}, {"rank": 8, "eval_loss": 1.0, "style": 0.85}]
    words = rep._resize_words({"resize": {"lora-r16": res}, "models": {"lora-r16": ref}})
    assert words == ["The trained r=16 LoRA (eval loss 1.000, style 1.00) loses quality at the first cut; "
                     "at r=8 the eval loss is 1.000 (+0.0%), style 0.85."]  # fmt: skip


def test_quality_drop_is_found():
    ref = {"eval_loss": 1.0, "style": 1.0}
    res = [{"rank": 4, "eval_loss": 1.0, "style": 1.0}, {"rank": 2, "eval_loss": 1.015, "style": 0.95},
           {"rank": 1, "eval_loss": 1.3, "style": 0.5}]  # fmt: skip
    words = rep._resize_words({"resize": {"lora": res}, "models": {"lora": ref}})
    assert words == ["The trained r=4 LoRA (eval loss 1.000, style 1.00) keeps its quality down to r=2; "
                     "at r=1 the eval loss is 1.300 (+30.0%), style 0.50."]  # fmt: skip


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--ranks", "0"], "--ranks '0': ranks must be integers >= 1"),
        (["--ranks", "two"], "--ranks 'two': give comma-separated integers"),
        (["--energy", "1.5"], "--energy 1.5: must be in (0, 1]"),
        (["--steps", "0"], "--steps must be positive"),
        (["--eval-facts", "0"], "--eval-facts must be positive"),
    ],
)
def test_bad_requests_are_one_line(argv, msg, tmp_path, capsys):
    assert lowrank.main([*argv, "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraforge lowrank: error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()  # refused before anything was written
