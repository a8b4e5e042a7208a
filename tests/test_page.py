"""The run's page: the throughput chart, the samples the model actors make for it (thumbnails,
picks, stats) and the sections drawn from them, checked in headless Chromium where it is installed."""

from __future__ import annotations

import pytest

from pipeline.page import throughput_plot, throughput_series

# The demo's timeline (359 images in 4 parts, two pairs of parts reaching the driver 7 and 35 ms apart)
DEMO_TIMELINE = [[11.682, 90], [11.689, 180], [12.339, 270], [12.374, 359]]


def test_throughput_line_reaches_the_total_and_the_rate_is_per_window_not_per_part():
    fig = throughput_plot(DEMO_TIMELINE, 11.7, 12.3, end=12.383)
    ax, rate_ax = fig.axes
    done = ax.lines[0]
    assert done.get_ydata()[-1] == 359 and done.get_xdata()[-1] == pytest.approx(12.383)
    assert ax.get_xlim()[1] > 12.383 and ax.get_ylim()[1] > 359  # the end is inside the axes, not on their edge
    s = throughput_series(DEMO_TIMELINE, end=12.383)
    assert s["window"] >= 1.0
    # between neighbouring parts the rate read 90 / 0.007 s = 12,857 images/s; a second's window
    # can hold at most the run's 359 images
    assert 0 < max(s["rate"]) <= 359 / s["window"]
    heights = rate_ax.patches[0].get_data().values
    assert max(heights) == pytest.approx(max(s["rate"]))
    # images per window add up to the total: nothing lost at the run's end
    widths = [b - a for a, b in zip(s["edges"], s["edges"][1:], strict=False)]
    assert sum(r * w for r, w in zip(s["rate"], widths, strict=True)) == pytest.approx(359)


def test_a_steady_run_reads_its_steady_rate():
    timeline = [[5 + 0.5 * i, 100 * (i + 1)] for i in range(120)]  # 200 images/s from 5 s to 64.5 s
    s = throughput_series(timeline, end=64.5)
    assert s["window"] == pytest.approx((64.5 - 5) / 20)
    edges = s["edges"]
    for i in range(2, len(s["rate"])):  # every window after the first part: within one part (100 images) of 200/s
        width = edges[i + 1] - edges[i]
        assert abs(s["rate"][i] * width - 200 * width) <= 100 + 1e-6, (i, s["rate"][i])
    assert s["done_n"][-1] == 12_000
