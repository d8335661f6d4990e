"Claim kinds, verdicts, the minimum detectable effect and Holm's adjustment, against independent references."
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from alignlora.experiments import (CLAIM_COLUMNS, adjust_claim_files, adjust_claims, claim_row, claims_summary, holm, mde,
                                   paired_bootstrap, read_table, write_claims)


def _ours(diff, lo, hi, p=0.01, se=0.01, n=100):
    return dict(diff=diff, lo=lo, hi=hi, p=p / 2, p_two_sided=p, se=se, n=n)


def test_holm_hand_worked():
    # p = .04 .01 .03 .005 .2 (m = 5); sorted .005 .01 .03 .04 .2
    # × 5 4 3 2 1 → .025 .04 .09 .08 .2; running maximum → .025 .04 .09 .09 .2; back in input order:
    assert np.allclose(holm([0.04, 0.01, 0.03, 0.005, 0.2]), [0.09, 0.04, 0.09, 0.025, 0.2])
    assert np.allclose(holm([0.3, 0.6]), [0.6, 0.6])          # 2 × .3 = .6, then max(.6, .6)
    assert np.allclose(holm([0.7, 0.9]), [1.0, 1.0])          # capped at 1
    assert holm([]).shape == (0,)


def test_holm_against_statsmodels_when_installed():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(4).random(40) ** 2
    assert np.allclose(holm(p), multitest.multipletests(p, method="holm")[1])


def test_holm_against_bonferroni_bounds():
    "Float reference: Holm lies between the smallest p·(m−rank+1) and Bonferroni's m·p."
    p = np.random.default_rng(5).random(25) ** 3
    h = holm(p)
    assert np.all(h <= np.minimum(1, len(p) * p) + 1e-15)
    assert np.all(h >= p)
    assert np.all(np.diff(h[np.argsort(p)]) >= -1e-15)        # monotone in p


def test_mde_is_the_normal_theory_formula():
    assert mde(1.0) == pytest.approx(stats.norm.ppf(0.975) + stats.norm.ppf(0.8))
    assert mde(1.0) == pytest.approx(2.8016, abs=1e-4)


def test_mde_on_synthetic_paired_data_with_known_variance():
    "Per-row differences with σ = 0.5 over n rows: MDE ≈ 2.80 σ / √n (in points: × 100)."
    rng = np.random.default_rng(0)
    n, sigma = 400, 0.5
    base = rng.random(n)
    a, b = base + rng.normal(0, sigma, n), base          # d_i = a_i − b_i ~ N(0, σ²)
    row = claim_row("a > b", 1.0, paired_bootstrap(a, b, n_boot=4000))
    expected = 100 * (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * sigma / math.sqrt(n)
    assert row["mde"] == pytest.approx(expected, rel=0.1)


def test_mde_has_80_percent_power():
    "Datasets whose true difference equals the MDE are declared (interval excludes 0) about 80% of the time."
    rng = np.random.default_rng(1)
    n, sigma, reps = 100, 1.0, 300
    true = mde(sigma / math.sqrt(n))
    hits = 0
    for k in range(reps):
        d = rng.normal(true, sigma, n)
        r = claim_row("d > 0", 1.0, paired_bootstrap(d, np.zeros(n), n_boot=400, seed=k), scale=1)
        hits += r["verdict"] == "supported"
    assert 0.72 <= hits / reps <= 0.88


def test_seed_spread_widens_the_standard_error():
    base = _ours(0.02, 0.005, 0.035, se=0.01)
    one = claim_row("x", 1.0, base)
    three = claim_row("x", 1.0, base | dict(seed_diffs=[0.0, 0.02, 0.04]))
    se3 = math.sqrt(1.0 ** 2 + np.var([0, 2, 4], ddof=1) / 3)   # in points
    assert three["mde"] == pytest.approx(mde(se3), abs=1e-3)
    assert three["mde"] > one["mde"]


@pytest.mark.parametrize("diff,lo,hi,paper,expected", [
    (0.02, 0.01, 0.03, 1.4, "supported"), (-0.02, -0.03, -0.01, 1.4, "contradicted"),
    (0.01, -0.01, 0.03, 1.4, "inconclusive"), (-0.02, -0.03, -0.01, -0.5, "supported"),
])
def test_effect_verdicts(diff, lo, hi, paper, expected):
    r = claim_row("x", paper, _ours(diff, lo, hi))
    assert r["verdict"] == expected
    assert r["kind"] == "effect"
    assert list(r) == CLAIM_COLUMNS
    assert r["ratio"] == pytest.approx(round(100 * diff / paper, 2))


def test_sign_only_effect_has_no_ratio():
    r = claim_row("x", None, _ours(-0.02, -0.03, -0.01), direction=-1)
    assert r["verdict"] == "supported"
    assert np.isnan(r["ratio"])
    assert "sign only" in r["paper"]
    with pytest.raises(ValueError, match="needs the paper's sign"):
        claim_row("x", None, _ours(0.02, 0.01, 0.03))           # an effect claim needs a direction


def test_exact_verdicts():
    assert claim_row("%P", 0.45, 0.4553, kind="exact")["verdict"] == "match"          # truncated
    assert claim_row("%P", 0.46, 0.4553, kind="exact")["verdict"] == "match"          # rounded
    assert claim_row("%P", 0.06, 0.172, kind="exact")["verdict"] == "mismatch"
    # a %Param whose setting the paper does not state is not comparable, whatever ours is
    assert claim_row("%P", 0.06, 0.172, kind="exact", stated=False)["verdict"] == "not comparable"
    assert claim_row("%P", 0.06, None, kind="exact", stated=False)["verdict"] == "not comparable"
    r = claim_row("%P", 0.42, 0.406, kind="exact", inconsistent="Table 1 prints 0.41")
    assert r["verdict"] == "paper inconsistent"
    assert "Table 1" in r["note"]
    assert claim_row("%P", 0.41, 0.406, kind="exact", inconsistent="Table 5 prints 0.42")["verdict"] == "match"
    assert claim_row("extra", 0, 0, kind="exact", decimals=0)["verdict"] == "match"
    assert claim_row("extra", 0, 12, kind="exact", decimals=0)["verdict"] == "mismatch"


def test_adjustment_round_trip_through_files(tmp_path):
    rows = [claim_row(c, 1.0, _ours(0.02, 0.01, 0.03, p=p)) for c, p in [("a", 0.01), ("b", 0.04), ("c", 0.03), ("d", 0.005)]]
    write_claims(rows[:2] + [claim_row("%P", 0.45, 0.458, kind="exact")], "one", tmp_path, dict(profile="t"))
    write_claims(rows[2:] + [claim_row("d", None, 1.0, kind="descriptive")], "two", tmp_path, dict(profile="t"))
    both = adjust_claim_files(tmp_path)
    eff = both[both.kind == "effect"]
    assert eff.p_adjusted.tolist() == pytest.approx(list(holm([0.01, 0.04, 0.03, 0.005])))
    assert eff.adjusted_verdict.tolist() == ["supported", "inconclusive", "inconclusive", "supported"]
    one, prov = read_table(tmp_path / "claims_one.csv")
    assert prov == dict(profile="t")
    assert one.p_adjusted.iloc[0] == pytest.approx(0.03)
    assert np.isnan(one.p_adjusted.iloc[2])
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    s = claims_summary(both)
    assert "**effect** (4): 4 supported" in s
    assert "2 supported, 0 contradicted, 2 inconclusive" in s
    assert "**exact** (1): 1 match" in s
    assert "**descriptive** (not counted): 1" in s


def test_old_claims_files_are_read():
    old = pd.DataFrame([dict(table="t", claim="x", paper=1.0, ours=2.0, interval="[-1.0, 5.0]", n=10, verdict="within noise"),
                        dict(table="t", claim="%P", paper=0.45, ours=0.458, interval="exact", n=0, verdict="supported")])
    a = adjust_claims(old)
    assert a.kind.tolist() == ["effect", "exact"]
    assert a.verdict.iloc[0] == "inconclusive"
    assert a.adjusted_verdict.iloc[0] == ""


def test_paired_bootstrap_strata_against_an_explicit_loop():
    "Strata: one generator resamples each stratum's rows in turn; the estimate is the macro average over strata."
    a = {"q": [1.0, 0.0, 1.0, 1.0], "p": [0.0, 1.0]}
    b = {"q": [0.0, 0.0, 1.0, 0.0], "p": [0.0, 0.0]}
    rng, boots = np.random.default_rng(7), np.zeros(500)
    for t in a:
        d = np.subtract(a[t], b[t])
        boots += d[rng.integers(0, len(d), size=(500, len(d)))].mean(1) / 2
    r = paired_bootstrap(a, b, n_boot=500, seed=7)
    assert r["diff"] == pytest.approx((0.5 + 0.5) / 2)
    assert r["se"] == pytest.approx(float(np.std(boots, ddof=1)), abs=1e-15)
    assert r["n"] == 6


def test_paired_bootstrap_one_sample_is_the_mean_itself():
    a = [1.0, 0.0, 1.0]
    one = paired_bootstrap(a, n_boot=300)
    assert one["diff"] == pytest.approx(2 / 3)
    assert one == paired_bootstrap(a, [0.0, 0.0, 0.0], n_boot=300)


def test_paired_bootstrap_rejects_mismatched_input():
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="different strata"):
        paired_bootstrap({"q": [1.0]}, {"p": [1.0]})
