"""StepCosts: decode steps' times by rows, and how many guesses pay for their rows."""
import pytest

from textmill.engine.step_costs import PRIOR_FIXED, PRIOR_FIXED_EXPERTS, SAMPLES, SETTLED, STALE, StepCosts


def test_no_guess_before_a_plain_step_of_as_many_rows_is_timed():
    costs = StepCosts()
    assert costs.estimate(1) is None
    assert costs.worth_taking(1, [1.0, 1.0]) == 0
    costs.record(2, 0.010)
    assert costs.worth_taking(1, [1.0, 1.0]) == 0
    costs.record(1, 0.010)
    assert costs.worth_taking(1, [1.0, 1.0]) == 2


def test_a_row_count_costs_the_median_of_its_last_steps():
    costs = StepCosts()
    for seconds in (0.010, 0.011, 0.500, 0.012):  # one step stalled by a neighbour
        costs.record(4, seconds)
    assert costs.estimate(4) == pytest.approx(0.0115)
    for _ in range(SAMPLES):
        costs.record(4, 0.020)
    assert costs.estimate(4) == pytest.approx(0.020)  # only the last SAMPLES count


def test_untimed_row_counts_lie_on_the_line_of_timed_ones_or_follow_the_prior():
    costs = StepCosts()
    costs.record(2, 0.010)
    assert costs.estimate(20) == pytest.approx(0.010 * (PRIOR_FIXED + 20) / (PRIOR_FIXED + 2))
    for _ in range(SETTLED):
        costs.record(10, 0.030)
    assert costs.estimate(6) == pytest.approx(0.020)
    assert costs.estimate(1) == pytest.approx(0.010 * (PRIOR_FIXED + 1) / (PRIOR_FIXED + 2))
    assert costs.estimate(20) == pytest.approx(0.055)  # 2.5 ms a row, as from 2 to 10


def test_a_stalled_step_timed_once_does_not_keep_guesses_off():
    costs = StepCosts()
    costs.record(1, 0.010)
    costs.record(5, 1.0)  # stalled by a neighbour
    prior = 0.010 * (PRIOR_FIXED + 5) / (PRIOR_FIXED + 1)
    assert costs.estimate(5) == pytest.approx(prior)  # no dearer than its neighbour makes it
    assert costs.worth_taking(1, [0.5, 0.5, 0.5, 0.5]) == 4
    for _ in range(SETTLED - 1):  # dear every time: then it is
        costs.record(5, 1.0)
    assert costs.estimate(5) == pytest.approx(1.0)
    assert costs.worth_taking(1, [0.5, 0.5, 0.5, 0.5]) == 0


def test_old_times_are_dropped_once_stale():
    costs = StepCosts()
    for _ in range(SETTLED):
        costs.record(5, 1.0)
    for _ in range(STALE):
        costs.record(1, 0.010)
    assert costs.estimate(5) == pytest.approx(0.010 * (PRIOR_FIXED + 5) / (PRIOR_FIXED + 1))
    costs.record(5, 0.012)
    assert costs.estimate(5) == pytest.approx(0.012)  # the stale times do not come back


def test_guesses_are_taken_while_they_raise_tokens_a_second():
    def timed(cost, rows):
        costs = StepCosts()
        for n in rows:
            costs.record(n, cost(n))
        return costs

    rows = range(1, 40)
    streaming = timed(lambda n: 1.0 + 0.02 * n, rows)  # rows nearly free: every likely guess
    assert streaming.worth_taking(1, [0.9, 0.8, 0.5, 0.1]) == 4
    assert streaming.worth_taking(1, [0.9, 0.8, 0.5, 0.001]) == 3
    computing = timed(lambda n: 0.01 * n, rows)  # every row its share: no guess that may fail
    assert computing.worth_taking(16, [0.99, 0.95, 0.9]) == 0
    # Fixed work the size of 8 rows: at 4 rows (4 tokens in 12) a guess pays while it holds
    # more often than the tokens a row so far: 4.9 in 13, 5.4 in 14, 5.85 in 15, not 6.15 in 16.
    mixed = timed(lambda n: 8 + n, rows)
    assert mixed.worth_taking(4, [0.9, 0.5, 0.45, 0.3, 0.2]) == 3
    # A promise below MIN_GAIN is not taken: 4.4 tokens in 13 beat 4 in 12 by 1.5%.
    assert mixed.worth_taking(4, [0.4]) == 0


def test_a_few_percent_of_noise_between_near_counts_does_not_set_the_slope():
    """10 ms and 1 ms a row, 63 rows timed 1% slow: past 64 rows the line still rises."""
    costs = StepCosts()
    for n in range(1, 65):
        for _ in range(SETTLED):
            costs.record(n, (10 + n) * (1.01 if n == 63 else 1.0) / 1e3)
    assert costs.estimate(320) == pytest.approx(0.330, rel=0.02)
    assert costs.worth_taking(64, [0.5] * 256) == 0
    costs.record(320, 0.330)  # timed once: what one neighbour says does not undercut it
    assert costs.estimate(320) == pytest.approx(0.330)
    assert costs.worth_taking(64, [0.5] * 256) == 0


def test_a_mixture_of_experts_prices_untimed_rows_dearer():
    """Each guessed row of a mixture of experts reads experts of its own: before a 5-row step is
    timed, it is taken at (2 + 5) / (2 + 1) of a one-row step, where a dense model's is 13 / 9."""
    dense, experts = StepCosts(), StepCosts(PRIOR_FIXED_EXPERTS)
    for costs in (dense, experts):
        costs.record(1, 0.030)
    assert experts.estimate(5) == pytest.approx(0.030 * 7 / 3)
    assert dense.estimate(5) == pytest.approx(0.030 * 13 / 9)
    odds = [0.3] * 4  # ngram guesses of a text that repeats a little
    assert dense.worth_taking(1, odds) > 0 and experts.worth_taking(1, odds) == 0
