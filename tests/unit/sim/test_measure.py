"""The storm's measures: Prometheus' histogram_quantile over the daemon's own latency histogram."""

from __future__ import annotations

import math

import pytest

from a2bd.sim.measure import histogram_quantile
from a2bd.sim.storm import StormReport, Verdict, histogram_buckets

INF = math.inf


@pytest.mark.parametrize(("q", "buckets", "expected"), [
    (0.5, {0.001: 0, 0.002: 100, INF: 100}, 0.0015),  # linear inside the bucket the rank falls in
    (0.99, {0.001: 90, 0.005: 98, 0.01: 100, INF: 100}, 0.0075),
    (0.5, {0.001: 60, 0.002: 100, INF: 100}, 0.001 * 50 / 60),  # the first bucket starts at 0
    (0.99, {0.001: 10, 0.01: 50, INF: 100}, 0.01),  # in +Inf: the highest finite bound, as Prometheus
    (0.9, {0.001: 100, 0.002: 100, INF: 100}, 0.0009),  # empty buckets above are skipped
])
def test_histogram_quantile_follows_prometheus(q: float, buckets: dict[float, float], expected: float) -> None:
    assert histogram_quantile(q, buckets) == pytest.approx(expected)


def test_an_empty_histogram_has_no_quantile() -> None:
    assert math.isnan(histogram_quantile(0.99, {0.001: 0, INF: 0}))
    assert math.isnan(histogram_quantile(0.99, {}))


def test_the_daemon_buckets_are_read_from_a_scrape_and_differenced() -> None:
    earlier = {"a2bd_authorize_seconds_bucket{le=0.001}": 5.0, "a2bd_authorize_seconds_bucket{le=+Inf}": 6.0}
    later = {"a2bd_authorize_seconds_bucket{le=0.001}": 15.0, "a2bd_authorize_seconds_bucket{le=+Inf}": 26.0,
             "a2bd_authorize_seconds_count{}": 26.0, "a2bd_live_calls{}": 3.0}
    assert histogram_buckets(later) == {0.001: 15.0, INF: 26.0}
    assert histogram_buckets(later, earlier) == {0.001: 10.0, INF: 20.0}
    assert histogram_buckets(later, name="a2bd_loop_lag_seconds") == {}


def test_the_report_reads_the_daemons_own_figures_from_its_last_scrape() -> None:
    first = {"a2bd_authorize_seconds_bucket{le=0.001}": 0.0, "a2bd_authorize_seconds_bucket{le=+Inf}": 0.0}
    last = {"a2bd_authorize_seconds_bucket{le=0.001}": 90.0, "a2bd_authorize_seconds_bucket{le=0.01}": 100.0,
            "a2bd_authorize_seconds_bucket{le=+Inf}": 100.0,
            "a2bd_loop_lag_seconds_bucket{le=0.002}": 10.0, "a2bd_loop_lag_seconds_bucket{le=+Inf}": 10.0,
            "a2bd_agi_rejected_total{reason=over_capacity}": 3.0, "a2bd_agi_rejected_total{reason=peer}": 0.0}
    report = StormReport([], 0.0, [], Verdict(), scrapes=[(1.0, first), (2.0, last)])
    assert report.daemon_quantile_ms(0.99) == pytest.approx(0.001 * 1000 + 9 * 9 / 10)  # 9.1 ms, interpolated
    assert report.daemon_quantile_ms(0.5, "a2bd_loop_lag_seconds") == pytest.approx(1.0)
    assert report.agi_rejected() == {"over_capacity": 3}  # reasons never counted are left out
    empty = StormReport([], 0.0, [], Verdict())
    assert (empty.daemon_quantile_ms(0.99), empty.agi_rejected()) == (None, {})
