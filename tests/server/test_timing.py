"""The timeline of a request: each step lasts from the end of the one before, and the
Server-Timing header lists them, ``respond`` up to the response's start, and the total."""

import pytest

from server.timing import Timeline


def test_each_step_lasts_from_the_end_of_the_previous_one():
    timeline = Timeline(start=10.0)
    timeline.mark("receive", 10.002)
    timeline.mark("decode", 10.0025)
    assert timeline.steps() == [
        ("receive", pytest.approx(0.002)),
        ("decode", pytest.approx(0.0005)),
    ]


def test_the_header_ends_with_respond_and_the_total_in_milliseconds():
    timeline = Timeline(start=1.0)
    timeline.mark("receive", 1.001)
    assert timeline.finish(1.0015) == "receive;dur=1.000, respond;dur=0.500, total;dur=1.500"


def test_a_request_that_marked_no_step_has_its_total_only():
    assert Timeline(start=2.0).finish(2.25) == "total;dur=250.000"
