"""The Arena's leaderboard maths (backend.arena.ratings) on cases that can be worked out by hand."""
from __future__ import annotations

import math
import random

import pytest

from backend.arena.ratings import bootstrap_intervals, bradley_terry, leaderboard, online_elo, score_a, win_rates


def test_three_wins_to_one_is_odds_of_three_on_the_rating_scale():
    votes = [("x", "y", "a")] * 3 + [("x", "y", "b")]
    plain = bradley_terry(votes, prior=0)
    # MLE: P(x beats y) = 3/4, so 10^(diff/400) = 3.
    assert plain["x"] - plain["y"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert (plain["x"] + plain["y"]) / 2 == pytest.approx(1000)
    # The default weak prior pulls the two together only slightly.
    shrunk = bradley_terry(votes)
    assert 0 < plain["x"] - shrunk["x"] < 2


def test_ties_and_both_bad_count_half():
    # x: 1 win + 2 halves = 2 points, y: 2 halves = 1 point, so the odds are 2 to 1.
    r = bradley_terry([("x", "y", "a"), ("x", "y", "tie"), ("y", "x", "both_bad")], prior=0)
    assert r["x"] - r["y"] == pytest.approx(400 * math.log10(2), abs=1e-6)


def test_symmetric_votes_give_equal_scores():
    assert bradley_terry([("x", "y", "a"), ("x", "y", "b")]) == pytest.approx({"x": 1000, "y": 1000})
    assert bradley_terry([("x", "y", "tie")] * 5) == pytest.approx({"x": 1000, "y": 1000})
    # A cycle: each beats the next once.
    cycle = bradley_terry([("p", "q", "a"), ("q", "r", "a"), ("r", "p", "a")], prior=0)
    assert cycle == pytest.approx({"p": 1000, "q": 1000, "r": 1000})


def test_the_side_a_model_sits_on_does_not_matter():
    left = bradley_terry([("x", "y", "a"), ("x", "z", "a"), ("y", "z", "b")])
    right = bradley_terry([("y", "x", "b"), ("z", "x", "b"), ("z", "y", "a")])
    assert left == pytest.approx(right)


def test_a_model_that_always_wins_ranks_first_and_stays_finite():
    votes = [("champ", "y", "a"), ("z", "champ", "b"), ("y", "z", "a"), ("z", "y", "tie"), ("champ", "z", "a")]
    board = leaderboard(votes, bootstrap=50)
    rows = board["rows"]
    assert rows[0]["model"] == "champ"
    assert all(math.isfinite(r["rating"]) for r in rows)
    assert rows[0]["wins"] == 3 and rows[0]["losses"] == 0 and rows[0]["win_rate"] == 1.0
    assert board["votes"] == 5


def test_bootstrap_interval_contains_the_fit_and_narrows_with_more_votes():
    rng = random.Random(0)

    def votes(n):  # x beats y 70% of the time
        return [("x", "y", "a" if rng.random() < 0.7 else "b") for _ in range(n)]
    few, many = votes(20), votes(2000)
    width = {}
    for name, v in (("few", few), ("many", many)):
        fit = bradley_terry(v)
        ci = bootstrap_intervals(v, rounds=200, seed=1)
        lo, hi = ci["x"]
        assert lo <= fit["x"] <= hi
        width[name] = hi - lo
    assert width["many"] < width["few"] / 4
    # The same seed gives the same intervals.
    assert bootstrap_intervals(few, rounds=50, seed=3) == bootstrap_intervals(few, rounds=50, seed=3)


def test_rank_counts_only_models_clearly_above():
    votes = [("x", "y", "a")] * 60 + [("y", "z", "a"), ("z", "y", "a")] * 5 + [("x", "z", "a")] * 60
    rows = {r["model"]: r for r in leaderboard(votes, bootstrap=100)["rows"]}
    assert rows["x"]["rank"] == 1
    assert rows["y"]["rank"] == rows["z"]["rank"] == 2  # y and z are level: both only below x


def test_online_elo_by_hand_and_its_dependence_on_order():
    assert online_elo([("x", "y", "a")], k=32) == {"x": 1016, "y": 984}
    assert online_elo([("x", "y", "tie")], k=32) == {"x": 1000, "y": 1000}
    # Second game: x expected 1/(1+10^(-32/400)), loses it.
    e = 1 / (1 + 10 ** (-32 / 400))
    assert online_elo([("x", "y", "a"), ("x", "y", "b")], k=32)["x"] == pytest.approx(1016 - 32 * e)
    order1 = online_elo([("x", "y", "a"), ("x", "y", "b")])
    order2 = online_elo([("x", "y", "b"), ("x", "y", "a")])
    assert order1["x"] < 1000 < order2["x"]  # Elo: whoever won last is ahead
    assert bradley_terry([("x", "y", "a"), ("x", "y", "b")]) == bradley_terry([("x", "y", "b"), ("x", "y", "a")])


def test_win_rate_matrix():
    models, rate, games = win_rates([("x", "y", "a"), ("y", "x", "tie"), ("x", "z", "b")])
    assert models == ["x", "y", "z"]
    assert rate[0][1] == pytest.approx(0.75) and rate[1][0] == pytest.approx(0.25)
    assert rate[0][2] == 0.0 and rate[2][0] == 1.0
    assert rate[1][2] is None and rate[0][0] is None
    assert games == [[0, 2, 1], [2, 0, 0], [1, 0, 0]]


def test_bad_winner_and_no_votes():
    with pytest.raises(ValueError, match="winner must be one of"):
        score_a("left")
    assert leaderboard([])["rows"] == [] and leaderboard([])["votes"] == 0
