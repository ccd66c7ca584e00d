"""Where the time of a request goes: its steps, answered in a ``Server-Timing`` header.

:class:`~server.metrics.RequestMetricsMiddleware` opens a :class:`Timeline` when a request
arrives and closes it when the response starts; in between, the code that serves the request
marks the end of each step it takes. The header then lists each step's duration in
milliseconds, in order, and the ``total`` (W3C Server Timing; browsers show it in their
developer tools, and ``benchmarks/serve.py`` reads it to say where a search's time went)::

    Server-Timing: receive;dur=0.61, decode;dur=0.74, queue;dur=0.09, engine;dur=14.2, ...,
                   total;dur=16.3

A search's steps (``server/services.py``): ``receive`` (the body, multipart parsing, form
validation, the API key), ``decode``, ``queue`` (until the inference worker starts the batch),
``engine`` (the worker's batch), ``wake`` (until the request runs again), ``search`` (the
gallery), ``respond`` (validating and serialising the answer).
"""

import time

STATE_KEY = "timeline"  # where the middleware keeps the timeline in the request's state


class Timeline:
    """Named steps of one request, each ending where the next begins (``time.perf_counter``
    seconds)."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.perf_counter() if start is None else start
        self._ends: list[tuple[str, float]] = []

    def mark(self, step: str, at: float | None = None) -> float:
        """End ``step`` now (or at ``at``): it lasted since the previous step ended. Returns
        the time marked."""
        end = time.perf_counter() if at is None else at
        self._ends.append((step, end))
        return end

    def steps(self) -> list[tuple[str, float]]:
        """(step, seconds) in order."""
        previous, steps = self.start, []
        for step, end in self._ends:
            steps.append((step, end - previous))
            previous = end
        return steps

    def finish(self, end: float) -> str:
        """Close the timeline as the response starts, at ``end``: a last step ``respond`` when
        any step was marked (validating and serialising the answer); returns the
        ``Server-Timing`` header value, the steps and the ``total``."""
        if self._ends:
            self.mark("respond", end)
        entries = [*self.steps(), ("total", end - self.start)]
        return ", ".join(f"{step};dur={seconds * 1000:.3f}" for step, seconds in entries)
