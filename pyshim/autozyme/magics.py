"""IPython magics, registered by ``%load_ext autozyme``.

- ``%autozyme``: what ``autozyme status`` says (the daemon, versions, this kernel's
  served and fallen-back calls).
- ``%%autozyme.profile``: runs the cell and shows one row per patched call made
  in it: the call, where it ran, the reason when it went to upstream, the time.
"""

from __future__ import annotations


class _Status:
    """``autozyme status`` for this kernel: a table in Jupyter, text elsewhere."""

    def __init__(self, st: dict):
        self.st = st

    def __repr__(self) -> str:
        from .status import format_status

        return format_status(self.st)

    def _repr_html_(self) -> str:
        from html import escape

        st = self.st
        d = st.get("daemon")
        daemon = (f"pid {d['pid']}, version {d['version']}, {d['threads']} threads, "
                  f"up {d['uptime_ms'] / 1000:.0f} s" if d else f"not running ({st.get('daemon_problem', '')})")
        head = (f"<p>autozyme {'active' if st['active'] else 'inactive'}; scanpy "
                f"{escape(str(st.get('scanpy_version')))}; daemon: {escape(daemon)}</p>")
        problems = st.get("version_problems") or {}
        rows = []
        for name, verified in st["verified_versions"].items():
            fell = sum((st["fallbacks"].get(name) or {}).values())
            reasons = "; ".join(f"{n} x {r}" for r, n in sorted((st["fallbacks"].get(name) or {}).items()))
            rows.append(
                "<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in (
                    name, ", ".join(verified), "falls back" if name in problems else "served here",
                    st["served"].get(name, 0), fell, reasons)) + "</tr>")
        return (head + "<table><thead><tr><th>call</th><th>verified on scanpy</th><th>here</th>"
                "<th>served</th><th>to upstream</th><th>reasons</th></tr></thead><tbody>"
                + "".join(rows) + "</tbody></table>")


def status_magic(line: str = ""):  # noqa: ARG001 - IPython passes the line
    from .status import status

    return _Status(status())


def profile_magic(line: str, cell: str):  # noqa: ARG001
    from IPython import get_ipython
    from IPython.display import display

    from .profile import profile

    shell = get_ipython()
    with profile() as p:
        shell.run_cell(cell)
    display(p)


def register(ipython) -> None:
    if ipython is None:
        return
    ipython.register_magic_function(status_magic, "line", "autozyme")
    ipython.register_magic_function(profile_magic, "cell", "autozyme.profile")
