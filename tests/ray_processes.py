"""Clusters tests start with `ray start`: free ports, and killing exactly their processes."""

import contextlib
import os
import random
import signal
import socket
import time
from pathlib import Path


def free_port() -> int:
    # Above Ray's default worker port range (10002-19999) and below the ephemeral one.
    for _ in range(100):
        port = random.randint(20000, 29999)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999")


def session_pids(session_id: int) -> list[int]:
    """Live (not zombie) processes of a session, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            # Fields after the ")" closing the command name: state, ppid, pgrp, session.
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] != "Z" and int(fields[3]) == session_id:
            pids.append(int(entry))
    return pids


def kill_session(session_id: int) -> None:
    """Kill every process of the session `ray start` led: the head's processes and the
    fake worker nodes the autoscaler spawned. Deliberately not `ray stop --force`: that
    kills every Ray process on the machine, other people's sessions included."""
    for _ in range(20):
        pids = session_pids(session_id)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
