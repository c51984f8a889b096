"""Where each patched call ran: ``autozyme.profile()`` and ``%%autozyme.profile``.

``with autozyme.profile() as p: ...`` records one row per patched scanpy call made
inside the block (by this process, any thread): ``call`` (scanpy's name, e.g.
``"normalize_total"``), ``ran`` (``"autozyme"`` or ``"upstream"``), ``reason`` (why
it went to upstream; ``None`` when autozyme ran it) and ``seconds``. ``p`` shows as
a table: HTML in Jupyter, text elsewhere. Calls scanpy makes to its own patched
functions inside another patched call are rows of their own.

The fallback wrapper reports every call here (``record``); when no profile is
open that is one list check.
"""

from __future__ import annotations

import html
import threading

_lock = threading.Lock()
_open: list[Profile] = []


class Profile:
    """The rows of one ``profile()`` block (``calls``), and their totals."""

    def __init__(self):
        self.calls: list[dict] = []

    def __enter__(self) -> Profile:
        with _lock:
            _open.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _lock:
            if self in _open:
                _open.remove(self)

    def totals(self) -> dict:
        """Calls and seconds per place a call ran."""
        out = {"autozyme": [0, 0.0], "upstream": [0, 0.0]}
        for row in self.calls:
            n_s = out.setdefault(row["ran"], [0, 0.0])
            n_s[0] += 1
            n_s[1] += row["seconds"]
        return {ran: {"calls": n, "seconds": s} for ran, (n, s) in out.items()}

    def _rows(self) -> list[tuple[str, str, str, str]]:
        return [(r["call"], r["ran"], f"{r['seconds']:.3f} s", r["reason"] or "") for r in self.calls]

    def _summary(self) -> str:
        t = self.totals()
        return (f"{len(self.calls)} calls: {t['autozyme']['calls']} by autozyme "
                f"({t['autozyme']['seconds']:.3f} s), {t['upstream']['calls']} by upstream "
                f"({t['upstream']['seconds']:.3f} s)")

    def __repr__(self) -> str:
        head = ("call", "ran", "time", "reason")
        rows = self._rows()
        widths = [max([len(head[i]), *(len(r[i]) for r in rows)]) for i in range(3)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head[:3], widths)) + "  " + head[3]]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        lines.append(self._summary())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cells = "".join(
            "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self._rows()
        )
        return ("<table><thead><tr><th>call</th><th>ran</th><th>time</th><th>reason</th></tr></thead>"
                f"<tbody>{cells}</tbody></table><p>{html.escape(self._summary())}</p>")


def profile() -> Profile:
    """A context manager recording where each patched call ran (see the module doc)."""
    return Profile()


def recording() -> bool:
    return bool(_open)


def record(call: str, ran: str, reason: str | None, seconds: float) -> None:
    row = {"call": call, "ran": ran, "reason": reason, "seconds": seconds}
    with _lock:
        for p in _open:
            p.calls.append(dict(row))
