"""From pairwise votes to a leaderboard, as LMArena does it. Pure functions over (model_a, model_b, winner).

- Bradley-Terry: P(i beats j) = 1 / (1 + 10^((R_j - R_i) / 400)). The ratings R maximise the likelihood of
  the votes (a tie counts as half a win for each side), fitted by Newton's method on the log-strengths.
  A weak Gaussian prior (`prior`, on natural-log strengths) keeps a model that has never lost finite; with
  many votes it changes nothing visible, and `prior=0` is the plain MLE. Ratings are centred on 1000.
- Confidence intervals: refit on bootstrap resamples of the votes, take the 2.5 and 97.5 percentiles.
  Rank (as LMArena's "rank (UB)"): 1 + the number of models whose lower bound is above this one's upper bound.
- Online Elo for comparison: one pass over the votes in order, each moving both ratings by k * surprise.
  Unlike Bradley-Terry it depends on the order of the votes and on k.
- Win-rate matrix: the share of points model i took from its battles against j (ties half).

"Both are bad" counts as a tie, as in LMArena's "tie (bothbad)".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

WINNERS = ("a", "b", "tie", "both_bad")
SCALE, BASE, INIT = 400.0, 10.0, 1000.0
PER_NAT = SCALE / math.log(BASE)  # rating points per unit of natural-log strength (~173.7)


def score_a(winner: str) -> float:
    """Points model A takes from one vote: 1, 0 or a half for either kind of tie."""
    if winner not in WINNERS:
        raise ValueError(f"winner must be one of {', '.join(WINNERS)}, not {winner!r}")
    return {"a": 1.0, "b": 0.0}.get(winner, 0.5)


def _index(votes) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Models (sorted) and per-vote arrays: index of A, index of B, A's points."""
    models = sorted({m for a, b, _ in votes for m in (a, b)})
    where = {m: i for i, m in enumerate(models)}
    ia = np.array([where[a] for a, _, _ in votes], dtype=np.int64)
    ib = np.array([where[b] for _, b, _ in votes], dtype=np.int64)
    s = np.array([score_a(w) for _, _, w in votes], dtype=np.float64)
    return models, ia, ib, s


def _points(n: int, ia, ib, s, weight=None) -> np.ndarray:
    """points[i, j]: what i took from its battles against j (a tie gives each side a half)."""
    w = np.ones_like(s) if weight is None else weight
    points = np.zeros((n, n))
    np.add.at(points, (ia, ib), w * s)
    np.add.at(points, (ib, ia), w * (1 - s))
    return points


def fit_strengths(points: np.ndarray, prior: float = 0.01, iters: int = 50, tol: float = 1e-10) -> np.ndarray:
    """Log-strengths theta (mean 0) maximising sum_ij points_ij log sigmoid(theta_i - theta_j) - prior/2 |theta|^2.

    Newton's method: gradient_i = sum_j points_ij - games_ij p_ij, Hessian = -(weighted graph Laplacian) - prior.
    Without a prior the Laplacian is singular along (1, ..., 1), the direction ratings do not care about:
    least squares takes the step orthogonal to it."""
    n = len(points)
    games = points + points.T
    theta = np.zeros(n)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))  # p[i, j] = P(i beats j)
        grad = points.sum(1) - (games * p).sum(1) - prior * theta
        w = games * p * (1 - p)
        neg_hess = np.diag(w.sum(1)) - w + prior * np.eye(n)
        step = np.linalg.lstsq(neg_hess, grad, rcond=None)[0]
        # Halve the step while it lowers the objective (Newton can overshoot when a model almost never loses).
        obj = _objective(points, theta, prior)
        t = 1.0
        while t > 1e-4 and _objective(points, theta + t * step, prior) < obj - 1e-12:
            t /= 2
        theta = theta + t * step
        theta -= theta.mean()
        if np.abs(t * step).max() < tol:
            break
    return theta


def _objective(points, theta, prior) -> float:
    d = theta[:, None] - theta[None, :]
    return float(-(points * np.logaddexp(0.0, -d)).sum() - prior / 2 * (theta ** 2).sum())


def to_rating(theta: np.ndarray) -> np.ndarray:
    return INIT + PER_NAT * theta


def bradley_terry(votes, prior: float = 0.01) -> dict[str, float]:
    """{model: rating} for votes [(model_a, model_b, winner), ...]."""
    if not votes:
        return {}
    models, ia, ib, s = _index(votes)
    return dict(zip(models, to_rating(fit_strengths(_points(len(models), ia, ib, s), prior)).tolist()))


def bootstrap_intervals(votes, rounds: int = 100, seed: int = 0, prior: float = 0.01,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """{model: (low, high)}: percentiles of the ratings refitted on `rounds` resamples of the votes."""
    if not votes or rounds <= 0:
        return {}
    models, ia, ib, s = _index(votes)
    rng = np.random.default_rng(seed)
    fits = np.empty((rounds, len(models)))
    for r in range(rounds):
        weight = np.bincount(rng.integers(0, len(s), len(s)), minlength=len(s)).astype(np.float64)  # votes drawn with replacement
        fits[r] = to_rating(fit_strengths(_points(len(models), ia, ib, s, weight), prior))
    lo, hi = np.percentile(fits, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return {m: (float(a), float(b)) for m, a, b in zip(models, lo, hi)}


def online_elo(votes, k: float = 32.0) -> dict[str, float]:
    """Classic Elo, one update per vote in the given order (FastChat's compute_online_elo, with k as given)."""
    rating: dict[str, float] = {}
    for a, b, winner in votes:
        ra, rb = rating.setdefault(a, INIT), rating.setdefault(b, INIT)
        expect_a = 1 / (1 + BASE ** ((rb - ra) / SCALE))
        sa = score_a(winner)
        rating[a] = ra + k * (sa - expect_a)
        rating[b] = rb + k * ((1 - sa) - (1 - expect_a))
    return rating


def win_rates(votes) -> tuple[list[str], list[list[float | None]], list[list[int]]]:
    """(models, rate[i][j] = share of points i took against j or None if they never met, battles[i][j])."""
    if not votes:
        return [], [], []
    models, ia, ib, s = _index(votes)
    points = _points(len(models), ia, ib, s)
    games = points + points.T
    rate = [[float(points[i, j] / games[i, j]) if games[i, j] else None for j in range(len(models))]
            for i in range(len(models))]
    return models, rate, games.astype(int).tolist()


# Below this many battles a model's interval is mostly the prior and its rank means little: the Arena shows
# neither, and says how many votes are still needed (Chatbot Arena similarly hides models with too few votes).
MIN_BATTLES = 10


@dataclass
class Row:
    model: str
    rating: float       # Bradley-Terry
    ci_low: float
    ci_high: float
    rank: int           # 1 + models whose interval lies entirely above this one's
    elo: float          # online Elo, for comparison
    battles: int
    wins: int
    losses: int
    ties: int           # both kinds
    win_rate: float     # points / battles


def leaderboard(votes, bootstrap: int = 100, seed: int = 0, k: float = 32.0, prior: float = 0.01) -> dict:
    """Everything the Arena shows: rows best first, the win-rate and battle-count matrices, the vote count."""
    votes = list(votes)
    bt = bradley_terry(votes, prior)
    ci = bootstrap_intervals(votes, bootstrap, seed, prior)
    elo = online_elo(votes, k)
    tally = {m: [0, 0, 0] for m in bt}  # wins, losses, ties
    for a, b, w in votes:
        sa = score_a(w)
        for m, mine in ((a, sa), (b, 1 - sa)):
            tally[m][0 if mine == 1 else 1 if mine == 0 else 2] += 1
    rows = []
    for m, r in bt.items():
        lo, hi = ci.get(m, (r, r))
        wins, losses, ties = tally[m]
        n = wins + losses + ties
        rows.append(Row(m, r, lo, hi, 0, elo[m], n, wins, losses, ties, (wins + ties / 2) / n))
    for row in rows:
        row.rank = 1 + sum(other.ci_low > row.ci_high for other in rows)
    rows.sort(key=lambda row: -row.rating)
    models, rate, games = win_rates(votes)
    return {"votes": len(votes), "rows": [row.__dict__ for row in rows],
            "win_rate": {"models": models, "rate": rate, "battles": games},
            "method": {"bootstrap_rounds": bootstrap, "seed": seed, "elo_k": k, "prior": prior,
                       "scale": SCALE, "base": BASE, "init": INIT}}
