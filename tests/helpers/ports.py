"""A free TCP port for a test's process group, so tests that launch ranks can run side by side (pytest -n)."""

import socket


def free_port() -> int:
    """A port the OS reports free now; the launcher binds it a moment later (a race too short to matter here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
