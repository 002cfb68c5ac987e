"""scripts/shapes_claims.py: equal generator steps, several seeds, intervals per cell and verdicts from intervals;
end to end at smoke size on CPU."""
from __future__ import annotations

import json

import pytest

from scripts import shapes_claims as sc
from utils.config import load_config

SEEDS = (1, 2, 3)


def _doc(scores: dict[tuple[str, int], float]) -> dict:
    return {"results": [{"stage": s, "split": "train", "length": n, "overall": v} for (s, n), v in scores.items()]}


def _evals(sf: float, base: float, teacher: float, long_gap: float) -> list[dict]:
    """Three seeds with a little noise: Self Forcing at `sf`, the baselines at `base`; at 3x the gap is `long_gap`."""
    docs = []
    for jitter in (-0.01, 0.0, 0.012):
        scores = {("teacher", 1): teacher + jitter}
        for s in ("dmd", "sid", "gan"):
            scores[(s, 1)], scores[(s, 3)] = sf + jitter, base + long_gap + jitter
        for s in ("teacher_forcing", "diffusion_forcing"):
            scores[(s, 1)], scores[(s, 3)] = base + jitter, base + jitter
        docs.append(_doc(scores))
    return docs


def test_t_interval_and_verdicts():
    ci = sc.t_interval([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["high"] - 2.0 == pytest.approx(4.303 / 3 ** 0.5)
    assert sc.verdict({"low": 0.1, "high": 0.2}) == "holds" and sc.verdict({"low": -0.2, "high": -0.1}) == "fails"
    assert sc.verdict({"low": -0.1, "high": 0.1}) == "undecided"
    assert sc.t_quantile(12) == sc.t_quantile(10) and sc.t_quantile(100) == 1.960


def test_claims_follow_the_intervals():
    good = {c["claim"][:20]: c["verdict"] for c in sc.judge(_evals(0.7, 0.5, 0.72, 0.4), "overall", (1, 3), 0.05)}
    assert list(good.values()) == ["holds", "holds", "holds"]
    bad = [c["verdict"] for c in sc.judge(_evals(0.4, 0.5, 0.9, -0.2), "overall", (1, 3), 0.05)]
    assert bad == ["fails", "fails", "fails"]
    noisy = _evals(0.7, 0.5, 0.72, 0.4)
    noisy[0]["results"][1]["overall"] = 0.1  # one seed's DMD far below: the intervals straddle
    assert sc.judge(noisy, "overall", (1, 3), 0.05)[0]["verdict"] == "undecided"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    args = ["--out", str(out), "--size", "smoke", "--seeds", ",".join(map(str, SEEDS)), "--generator-steps", "2",
            "--prompts", "2", "--lengths", "1,2", "--teacher-steps", "2", "--baseline-steps", "2", "--batch-size",
            "2", "--device", "cpu"]
    assert sc.main(args) == 0
    return out, args


@pytest.mark.slow
def test_tiny_claims_table_end_to_end(tiny, capsys):
    out, args = tiny
    table = json.loads((out / "claims.json").read_text())
    assert table["seeds"] == list(SEEDS) and table["lengths"] == [1, 2]
    for stage in sc.TABLE_STAGES:
        for n in ("1", "2"):
            cell = table["cells"][stage][n]
            if stage == "teacher" and n == "2":
                assert cell is None  # the bidirectional teacher has no rollout
                continue
            assert cell["n"] == len(SEEDS) and cell["low"] <= cell["mean"] <= cell["high"], (stage, n)
    assert [c["verdict"] in ("holds", "fails", "undecided") for c in table["claims"]] == [True] * 3
    assert (out / "claims.md").read_text().strip() == table["markdown"]
    # equal generator updates: a critic recipe runs ratio x as many loop steps; every seed its own seed
    for seed in SEEDS:
        dmd = load_config(out / f"seed_{seed}" / "dmd" / "config.yaml")
        tf = load_config(out / f"seed_{seed}" / "teacher_forcing" / "config.yaml")
        assert dmd.seed == tf.seed == seed
        assert dmd.optimiser.max_steps == 2 * dmd.distillation.dfake_gen_update_ratio and tf.optimiser.max_steps == 2
        assert json.loads((out / f"seed_{seed}" / "eval.json").read_text())["settings"]["seed"] == seed
    capsys.readouterr()
    assert sc.main(args) == 0  # a rerun trains and evaluates nothing again
    assert "[shapes] dmd ..." not in capsys.readouterr().out
