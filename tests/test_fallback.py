"""The fallback contract itself: whatever goes wrong inside a fast path, the user's
call returns upstream's result (or upstream's own error), and strict mode names
the reason. Exercised through the real wrapper activation installs."""

from __future__ import annotations

import numpy as np
import pytest

from autozyme import fallback, versions


def _upstream(x, *, factor=2):
    if x is None:
        raise TypeError("upstream refuses None")
    return x * factor


def _wrap(fast, verified=None):
    return fallback.fast_or_upstream(
        "toy", fast, _upstream, (versions.scanpy_version(),) if verified is None else verified
    )


def _fast_import_error(upstream, *args, **kwargs):
    from scanpy.preprocessing import _a_private_name_another_version_lacks  # noqa: F401

    return upstream(*args, **kwargs)


def _fast_attribute_error(upstream, *args, **kwargs):  # noqa: ARG001
    return args[0].no_such_attribute


@pytest.mark.parametrize("fast", [_fast_import_error, _fast_attribute_error])
def test_unexpected_exception_returns_upstreams_result(monkeypatch, fast):
    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    fallback.reset_counts()
    x = np.arange(5.0)
    np.testing.assert_array_equal(_wrap(fast)(x, factor=3), x * 3)
    reasons = fallback.counts()["fallbacks"]["toy"]
    [reason] = reasons
    assert reason.startswith("failure: unexpected ") and "in the fast path" in reason, reason


@pytest.mark.parametrize("fast", [_fast_import_error, _fast_attribute_error])
def test_strict_mode_names_the_unexpected_exception(monkeypatch, fast):
    monkeypatch.setenv("AUTOZYME_STRICT", "1")
    with pytest.raises(fallback.AutozymeFallbackError, match="unexpected .*Error in the fast path"):
        _wrap(fast)(np.arange(3.0))


def test_input_upstream_refuses_gets_upstreams_error_even_in_strict_mode(monkeypatch):
    monkeypatch.setenv("AUTOZYME_STRICT", "1")
    fallback.reset_counts()
    with pytest.raises(TypeError, match="upstream refuses None"):
        _wrap(_fast_attribute_error)(None)
    [reason] = fallback.counts()["fallbacks"]["toy"]
    assert reason.startswith("delegated: upstream raises too"), reason


def test_bad_input_is_refused_not_run_upstream(monkeypatch):
    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    ran = []

    def upstream(x):
        ran.append(x)
        return x

    def fast(upstream, x):  # noqa: ARG001
        raise fallback.BadInput("autozyme: malformed CSR: indptr decreases")

    wrapped = fallback.fast_or_upstream("toy", fast, upstream, (versions.scanpy_version(),))
    with pytest.raises(ValueError, match="indptr decreases"):
        wrapped(1)
    assert ran == []


def test_unverified_version_falls_back_per_patch(monkeypatch):
    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    monkeypatch.delenv("AUTOZYME_ALLOW_UNVERIFIED", raising=False)
    fallback.reset_counts()
    served_here = _wrap(lambda upstream, x: upstream(x, factor=5))
    not_here = fallback.fast_or_upstream("other", lambda upstream, x: upstream(x, factor=5),
                                         _upstream, ("0.0.1",))
    assert served_here(1) == 5
    assert not_here(1) == 2
    counts = fallback.counts()
    assert counts["served"] == {"toy": 1}
    assert any("is not verified (verified: 0.0.1)" in r for r in counts["fallbacks"]["other"])


def test_pick_takes_the_installed_or_the_nearest_older_record():
    records = {"1.11.5": "a", "1.12.4": "b"}
    assert versions.pick(records, "1.11.5") == "a"
    assert versions.pick(records, "1.12.4") == "b"
    assert versions.pick(records, "1.12.9") == "b"
    assert versions.pick(records, "1.12.0") == "a"
    assert versions.pick(records, "1.10.0") == "a"


def test_status_lists_verified_versions_per_call():
    import autozyme
    from autozyme import activation

    st = autozyme.status()
    assert set(st["verified_versions"]) == set(activation.TARGETS)
    assert st["scanpy_version"] == versions.scanpy_version()
    text = autozyme.format_status(st)
    for name in activation.TARGETS:
        assert f"  {name}: " in text


def test_readme_table_states_each_calls_verified_versions():
    """The README's table of supported releases says what the patches declare."""
    from pathlib import Path

    from autozyme import activation

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("<!-- verified-versions:", 1)[1].split("\n\n", 1)[0]
    stated = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`sc."):
            name = cells[0].split("`")[1].rsplit(".", 1)[1]
            stated[name] = tuple(v.strip() for v in cells[1].split(","))
    declared = activation.verified_versions()
    assert {k: sorted(v) for k, v in stated.items()} == {k: sorted(v) for k, v in declared.items()}
