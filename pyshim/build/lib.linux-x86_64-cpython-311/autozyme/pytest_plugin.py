"""pytest plugin: ``pytest -p autozyme.pytest_plugin`` runs a test suite (scanpy's
own, for one) with autozyme active from before collection.

Under ``AUTOZYME_STRICT=1`` a call that is in a fast path's scope but falls back
(no daemon, a daemon error) fails its test; calls outside the scope go to
upstream, as they would for a user, and are listed in the summary."""

from __future__ import annotations

import autozyme
from autozyme import fallback


def pytest_configure(config):  # noqa: ARG001
    fallback.set_strict_scope(False)
    autozyme.activate("scanpy", prewarm=False)


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    counts = fallback.counts()
    tr.section("autozyme")
    tr.write_line("served: " + (", ".join(f"{k} {v}" for k, v in sorted(counts["served"].items())) or "none"))
    for name, reasons in sorted(counts["fallbacks"].items()):
        for reason, n in sorted(reasons.items()):
            tr.write_line(f"upstream {name}: {n} x {reason}")
