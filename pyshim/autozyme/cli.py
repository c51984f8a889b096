"""The ``autozyme`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import runtime


def _daemon_start(_args) -> int:
    from .client import get_client

    try:
        conn = get_client().connection(autostart=True)
    except runtime.DaemonUnavailable as e:
        print(f"autozyme: cannot start the daemon: {e}", file=sys.stderr)
        return 1
    print(f"autozymed running: pid {conn.hello.pid}, {conn.hello.threads} threads, "
          f"socket {runtime.socket_path()}")
    return 0


def _daemon_stop(_args) -> int:
    from .client import get_client

    if get_client().shutdown():
        print("autozymed stopped")
        return 0
    if runtime.terminate_daemon():
        print("autozymed stopped (SIGTERM)")
        return 0
    print("autozymed is not running")
    return 0


def _status(args) -> int:
    from .status import format_status, status

    st = status()
    print(json.dumps(st, indent=2, default=str) if args.json else format_status(st))
    return 0


def _warm(args) -> int:
    from .warm import client

    if not client.enabled():
        print("autozyme: the warm worker is off (AUTOZYME_WARM=0)", file=sys.stderr)
        return 1
    if args.stop:
        print("warm worker stopped" if client.stop() else "warm worker is not running")
        return 0
    st = client.wait_warm(timeout=args.timeout) if args.wait else (client.start(), client.status())[1]
    if st is None:
        print("autozyme: the warm worker did not answer", file=sys.stderr)
        return 1
    print(f"warm worker: pid {st['pid']}, {st['state']}"
          + (f" ({st['warm_seconds']}s)" if st.get("warm_seconds") is not None else ""))
    return 0 if (st["state"] == "warm" or not args.wait) else 1


UNIT = """[Unit]
Description=autozyme daemon (scanpy accelerator)

[Service]
Type=simple
ExecStart={binary} --runtime-dir {runtime_dir} --idle-timeout 0
Restart=on-failure

[Install]
WantedBy=default.target
"""

LAUNCHD = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0"><dict>
  <key>Label</key><string>org.autozyme.daemon</string>
  <key>ProgramArguments</key><array>
    <string>{binary}</string><string>--runtime-dir</string><string>{runtime_dir}</string>
    <string>--idle-timeout</string><string>0</string></array>
  <key>RunAtLoad</key><true/>
  <key>KeepAlive</key><true/>
</dict></plist>
"""


def _install_service(args) -> int:
    binary = runtime.daemon_binary()
    if binary is None:
        print("autozyme: autozymed binary not found", file=sys.stderr)
        return 1
    fields = dict(binary=os.path.abspath(binary), runtime_dir=runtime.runtime_dir())
    if sys.platform == "darwin":
        path = Path.home() / "Library/LaunchAgents/org.autozyme.daemon.plist"
        text, enable = LAUNCHD.format(**fields), f"launchctl load -w {path}"
    else:
        config = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
        path = config / "systemd/user/autozymed.service"
        text = UNIT.format(**fields)
        enable = "systemctl --user daemon-reload && systemctl --user enable --now autozymed.service"
    if args.dry_run:
        print(f"# would write {path}\n{text}")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}:\n\n{text}")
    print(f"enable it with:\n  {enable}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autozyme", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("daemon", help="start, stop or inspect the per-user daemon")
    dsub = d.add_subparsers(dest="action", required=True)
    dsub.add_parser("start").set_defaults(func=_daemon_start)
    dsub.add_parser("stop").set_defaults(func=_daemon_stop)
    ds = dsub.add_parser("status")
    ds.add_argument("--json", action="store_true")
    ds.set_defaults(func=_status)
    inst = dsub.add_parser("install-service", help="start the daemon at login (systemd user unit / launchd agent)")
    inst.add_argument("--dry-run", action="store_true")
    inst.set_defaults(func=_install_service)

    s = sub.add_parser("status", help="daemon, shared memory and served/fallen-back calls")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_status)

    w = sub.add_parser("warm", help="start the warm worker (compiled neighbors/umap kernels) in the background")
    w.add_argument("--wait", action="store_true", help="block until it has compiled its kernels")
    w.add_argument("--timeout", type=float, default=900.0, help="with --wait: give up after this many seconds")
    w.add_argument("--stop", action="store_true", help="stop it instead")
    w.set_defaults(func=_warm)

    from .bench import cli as bench

    bench.add_parser(sub)

    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
