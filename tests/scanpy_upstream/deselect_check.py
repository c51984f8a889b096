"""pytest plugin: fail when an entry of deselect-<version>.txt matches no collected test.

Loaded by run_scanpy_tests.py (`-p deselect_check --expect-deselect=ID ...`), with and
without autozyme. run_scanpy_tests.py passes the deselect file's node ids that lie
within the tests it runs (an entry for another function's tests is not expected to
match); each must be a prefix of some collected node id, as pytest's own `--deselect`
matches them. A test renamed or removed upstream would otherwise leave a stale entry
that silently deselects nothing, which matters when the same lists are carried from
one scanpy version to the next.

Must not import scanpy (testing.scanpy._pytest asserts it is not imported yet).
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--expect-deselect",
        action="append",
        default=[],
        metavar="NODEID",
        help="a --deselect entry that must match at least one collected test",
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    # before pytest's own deselection (and -k) removes anything
    node_ids = [item.nodeid for item in items]
    result = yield
    expected = config.getoption("--expect-deselect")
    stale = [e for e in expected if not any(n.startswith(e) for n in node_ids)]
    if stale:
        msg = "deselect entries that match no collected test (renamed or removed upstream?): " + ", ".join(stale)
        raise pytest.UsageError(msg)
    return result
