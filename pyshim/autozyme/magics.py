"""IPython magics, registered by ``%load_ext autozyme``.

- ``%autozyme``: what ``autozyme status`` says (the daemon, versions, this kernel's
  served and fallen-back calls).
- ``%%autozyme.profile``: runs the cell and shows one row per patched call made
  in it: the call, where it ran, the reason when it went to upstream, the time.
"""

from __future__ import annotations


class _Text:
    """Shown as preformatted text in Jupyter and as plain text elsewhere."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(self.text)}</pre>"


def status_magic(line: str = ""):  # noqa: ARG001 - IPython passes the line
    from .status import format_status

    return _Text(format_status())


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
