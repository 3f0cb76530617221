import math

import numpy as np

from clax.metrics import summarize

NAN = np.nan


def test_metrics_match_spec_formulas_on_a_hand_written_matrix():
    A = np.array([
        [0.90, 0.40, NAN],
        [0.70, 0.80, 0.30],
        [0.60, 0.75, 0.95],
    ])
    b = np.array([0.10, 0.20, 0.25])
    m = summarize(A, b)
    assert math.isclose(m["acc"], (0.60 + 0.75 + 0.95) / 3)
    # BWT: mean over c < T-1 of A[T-1][c] - A[c][c]
    assert math.isclose(m["bwt"], ((0.60 - 0.90) + (0.75 - 0.80)) / 2)
    # FWT: mean over c >= 1 of A[c-1][c] - b[c]
    assert math.isclose(m["fwt"], ((0.40 - 0.20) + (0.30 - 0.25)) / 2)
    # Forgetting: mean over c < T-1 of max_{r < T-1} A[r][c] - A[T-1][c]
    assert math.isclose(m["forgetting"], ((0.90 - 0.60) + (0.80 - 0.75)) / 2)


def test_fwt_is_none_where_unseen_tasks_are_not_evaluated():
    A = np.array([[0.9, NAN], [0.8, 0.7]])
    assert summarize(A, np.array([0.5, 0.5]))["fwt"] is None
    assert summarize(A, None)["fwt"] is None


def test_bwt_of_an_unchanged_diagonal_is_exactly_zero():
    A = np.array([[0.9, 0.1], [0.9, 0.7]])
    m = summarize(A)
    assert m["bwt"] == 0.0 and m["forgetting"] == 0.0


def test_fwt_is_reported_in_til_and_none_in_cil_for_every_method():
    A = np.array([[0.9, 0.0], [0.8, 0.7]])  # CIL: task 1's classes never predicted before task 1
    b = np.array([0.1, 0.12])
    assert math.isclose(summarize(A, b, "til")["fwt"], 0.0 - 0.12)
    assert summarize(A, b, "cil")["fwt"] is None
    assert summarize(A, b)["fwt"] is not None  # no scenario given: the formula alone
