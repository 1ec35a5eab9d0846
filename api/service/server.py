"""Serving an app from a thread: the demo, the tests and the load benchmark start a real uvicorn
server on 127.0.0.1 inside their own process (`userllm serve` runs one in the foreground)."""

from __future__ import annotations

import socket
import threading
import time


class ServerThread:
    """`uvicorn.Server` serving `app` on `host` in a daemon thread, through a socket bound to
    port 0 unless a port is given (no race for a free port). A context manager."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):  # noqa: ANN001
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True, name="userllm-server")

    @property
    def app(self):  # noqa: ANN201
        return self.server.config.app

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 300
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.sock.close()
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
