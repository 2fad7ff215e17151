"""Whether the server can listen where it is told to, checked before anything binds, so that a
port in use is one clear line (grpc's own bind failure is a RuntimeError plus C-core log lines).
"""

import errno
import socket


def check_can_listen(host: str, port: int | None, flag: str) -> None:
    """ValueError naming `flag` when nothing can listen on host:port (port None: skipped; 0:
    the host alone, as a free port is always there on a host this machine has).

    The probe sets SO_REUSEADDR as grpc and uvicorn do, so a port left in TIME_WAIT by a
    previous run counts as free and only a live listener counts as in use."""
    if port is None:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            reason = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be listened on ({e.strerror})"
            raise ValueError(f"--{flag}: {where} {reason}") from None
