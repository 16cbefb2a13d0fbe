"""The lab: every experiment runs, declares its claim, and computes its verdict from what it measured."""

import json

import pytest

from steadygrad import lab
from steadygrad.lab.base import NOT_REPRODUCED, PARTLY, REPRODUCED, verdict

VERDICTS = {REPRODUCED, PARTLY, NOT_REPRODUCED}


@pytest.fixture(scope="module")
def quick_results(quick_lab):
    return quick_lab


def test_every_claim_is_declared_in_full():
    claims = lab.claims()
    assert [c.number for c in claims] == list(range(1, 25))
    for claim in claims:
        assert claim.title and claim.source and claim.setup and claim.expected and claim.teaches


def test_the_quick_lab_runs_every_claim_and_measures_a_verdict(quick_results):
    assert [r.claim.number for r in quick_results] == list(range(1, 25))
    for result in quick_results:
        assert not result.error, result.error
        assert result.verdict in VERDICTS and result.summary
        assert result.tables or result.figures
        for figure in result.figures:
            assert figure.png[:8] == b"\x89PNG\r\n\x1a\n"
        json.dumps(result.to_dict())  # serializable: NaN and inf become null


# claims whose outcome is exact (not a training result): they must hold even at the quick size
EXACT = [1, 2, 4, 8, 10, 11, 12, 15, 18]


@pytest.mark.parametrize("number", EXACT)
def test_exact_claims_are_reproduced_even_quick(quick_results, number):
    result = quick_results[number - 1]
    assert result.verdict == REPRODUCED, result.summary


def test_measured_numbers_back_the_verdicts(quick_results):
    by_number = {r.claim.number: r for r in quick_results}
    assert by_number[10].numbers["max_abs_difference"] < 1e-10
    assert by_number[11].numbers["relative_gap"] < 1e-5
    assert by_number[12].numbers["bias_to_weight_gradient"] < 1e-6
    assert by_number[8].numbers["single_vs_batched_agreement"] == 1.0
    assert by_number[3].numbers["spread"]["identical"] < 1e-6


# training claims whose quick version reproduces too: the quick run guards them (their full runs cost CI time)
@pytest.mark.parametrize("number", [17, 23])
def test_training_claims_reproduce_even_quick(quick_results, number):
    result = quick_results[number - 1]
    assert result.verdict == REPRODUCED, result.summary


@pytest.mark.parametrize("number", [5, 19, 22])
def test_training_claims_reproduce_at_full_size(number):
    (result,) = lab.run(only=[number])
    assert result.verdict == REPRODUCED, result.summary


def test_a_crashing_experiment_is_reported_and_the_others_still_run(monkeypatch):
    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(lab.EXPERIMENTS[0], "run", broken)
    results = lab.run(quick=True, only=[1, 10])
    assert results[0].verdict == "error" and "boom" in results[0].error
    assert results[1].verdict == REPRODUCED


def test_verdict_is_computed_from_checks():
    assert verdict(True, True) == REPRODUCED
    assert verdict(True, False) == PARTLY
    assert verdict(False, False) == NOT_REPRODUCED


def test_unknown_claim_numbers_are_refused():
    with pytest.raises(ValueError, match="No claim numbered 42; the claims are 1 to 24"):
        lab.run(only=[42])
