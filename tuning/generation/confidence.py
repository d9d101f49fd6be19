"""How sure a comparison of two models on the same prompts is: paired bootstrap intervals, the verdict they allow,
and the win rate with answer length controlled for.

    estimates = bootstrap(lambda rows: {"gain": b[rows].mean(-1) - a[rows].mean(-1)}, n, resamples, seed)
    # {"gain": {"value": mean(b - a), "interval": [low, high]}}
    verdict(estimates["gain"]["interval"], "higher")             # better | worse | no clear difference
    wins = outcomes(b_scores, a_scores)                          # 1, 0.5 (a tie) or 0 per prompt
    bootstrap(lambda rows: win_rates(wins, b_lengths - a_lengths, rows), n, resamples, seed)
    # {"raw": ..., "length_controlled": ...}: AlpacaEval 2.0's length control, sigmoid(intercept)

A statistic is a function of `rows`, a (k, n) array of prompt indices (one draw of the n prompts a row), that
returns each figure as a (k,) array: one numpy expression gives all the resamples at once, and the point estimate
is the same function of the prompts as they are (rows = [0 .. n-1]). Both models' figures are read at the same
rows, so each resample keeps the pairs (prompt, the first model's answer, the second's) together.

Generation floor: imports nothing of this project (numpy only).
"""

from __future__ import annotations

import numpy as np

PERCENTILES = (2.5, 97.5)  # the interval's ends: a 95% percentile interval
INTERVAL = "95% percentile bootstrap"  # how report.md names the intervals
# The length control's ridge penalty on its slope (not on the intercept): keeps the fit finite when length alone
# separates the wins from the losses (the slope would grow without end), and is too small to matter otherwise.
SLOPE_PENALTY = 1e-3
NEWTON_STEPS = 50  # at most; a 2-parameter logistic fit converges in about 10
LENGTH_CONTROL = ("logistic regression of \"the second model wins\" (ties as 0.5) on tanh(length difference / its "
                  "standard deviation), answer lengths in characters, read at zero length difference: "
                  "sigmoid(intercept), as AlpacaEval 2.0's length-controlled win rate (Dubois et al., 2024)")


def resampled_rows(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) prompt indices drawn with replacement: the same for a given (n, resamples, seed), so every
    figure of one report is resampled alike and a rerun gives the same intervals."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap(statistic, n: int, resamples: int, seed: int) -> dict[str, dict]:
    """{figure: {value, interval}} for each figure `statistic` gives: its value on the n prompts as they are,
    and the 2.5th and 97.5th percentiles of its values over the resamples."""
    point = statistic(np.arange(n)[None])
    draws = statistic(resampled_rows(n, resamples, seed))
    return {key: {"value": float(point[key][0]), "interval": [float(x) for x in np.percentile(draws[key], PERCENTILES)]}
            for key in point}


def side(interval: list[float], null: float = 0.0) -> int:
    """+1 when the whole interval is above `null`, -1 when below, 0 when it holds it."""
    return 1 if interval[0] > null else -1 if interval[1] < null else 0


def verdict(interval: list[float], way: str, null: float = 0.0) -> str:
    """"better" only when the interval excludes `null` on the side `way` (higher|lower) calls better; "worse" when
    it excludes it on the other side; else "no clear difference" (the data can't tell the models apart)."""
    sign = side(interval, null) * (1 if way == "higher" else -1)
    return "better" if sign > 0 else "worse" if sign < 0 else "no clear difference"


def outcomes(second: list[float], first: list[float]) -> np.ndarray:
    """Per prompt: 1 where the second model's score is higher, 0.5 for a tie, 0 where it is lower."""
    second, first = np.asarray(second, float), np.asarray(first, float)
    return np.where(second > first, 1.0, np.where(second == first, 0.5, 0.0))


def sigmoid(z):
    return 0.5 * (1 + np.tanh(0.5 * z))  # (1 / (1 + e^-z) without overflow)


def length_control_degenerate(wins: np.ndarray, length_differences: np.ndarray) -> str:
    """Why no length control can be fitted ("" when one can): every answer won, or every one lost (the intercept
    would be infinite: the wins need no length to explain them), or the length difference is the same on every
    prompt (nothing to regress on: length can't be told from quality). The raw win rate is reported then."""
    if np.all(wins == 1) or np.all(wins == 0):
        return f"every answer {'won' if wins[0] == 1 else 'lost'}, whatever its length: the raw win rate is reported"
    if np.ptp(length_differences) == 0:
        return ("the length difference is the same on every prompt, so there is no length effect to separate: the "
                "raw win rate is reported")
    return ""


def length_controlled_win_rates(wins, length_differences) -> np.ndarray:
    """For each row of outcomes `wins` (k, n; 1, 0.5 or 0) and length differences d (the second answer's length
    minus the first's), the win rate the second model would have with answers as long as the first's: a logistic
    regression of the outcomes on x = tanh(d / sd(d)), read at x = 0: sigmoid(intercept). A judge that prefers
    longer answers hands a longer model wins its length alone earns; this takes them out. The tanh keeps one
    very long answer from steering the slope. Fitted by Newton's method, all rows at once, each step halved until
    the row's loss falls. A degenerate row (see length_control_degenerate) gets its raw win rate."""
    y, d = np.atleast_2d(np.asarray(wins, float)), np.atleast_2d(np.asarray(length_differences, float))
    rates = y.mean(-1)
    fit = np.array([not length_control_degenerate(a, b) for a, b in zip(y, d)])
    if not fit.any():
        return rates
    y, d = y[fit], d[fit]
    x = np.tanh(d / d.std(-1, keepdims=True))
    features = np.stack([np.ones_like(x), x], axis=-1)  # (rows, n, 2): intercept, length
    penalty = np.array([0.0, SLOPE_PENALTY])

    def loss(beta):
        z = np.einsum("rnj,rj->rn", features, beta)
        return np.sum(np.logaddexp(0.0, z) - y * z, -1) + 0.5 * (beta ** 2) @ penalty

    beta = np.zeros((len(y), 2))
    for _ in range(NEWTON_STEPS):
        p = sigmoid(np.einsum("rnj,rj->rn", features, beta))
        gradient = np.einsum("rnj,rn->rj", features, p - y) + penalty * beta
        hessian = np.einsum("rni,rn,rnj->rij", features, p * (1 - p), features) + np.diag(penalty)
        step, scale, now = np.linalg.solve(hessian, gradient[..., None])[..., 0], np.ones(len(y)), loss(beta)
        while (worse := loss(beta - scale[:, None] * step) > now).any() and scale.min() > 1e-6:
            scale = np.where(worse, scale / 2, scale)
        beta = beta - scale[:, None] * step
        if np.abs(scale[:, None] * step).max() < 1e-10:
            break
    rates[fit] = sigmoid(beta[:, 0])
    return rates


def length_controlled_win_rate(wins, length_differences) -> float:
    """length_controlled_win_rates of one set of prompts."""
    return float(length_controlled_win_rates(wins, length_differences)[0])


def win_rates(wins, length_differences, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The raw and the length-controlled win rate on each row of prompts (a statistic for bootstrap)."""
    y, d = np.asarray(wins, float), np.asarray(length_differences, float)
    return {"raw": y[rows].mean(-1),
            "length_controlled": length_controlled_win_rates(y[rows], d[rows])}


def per_token(sums, counts, rows: np.ndarray) -> np.ndarray:
    """sum / count over each row of prompts: a mean per token when each prompt gives a sum over its tokens and
    their count, so a prompt weighs by its tokens, as in the whole (a mean of per-prompt means would not)."""
    sums, counts = np.asarray(sums, float), np.asarray(counts, float)
    return sums[rows].sum(-1) / np.maximum(1, counts[rows].sum(-1))
