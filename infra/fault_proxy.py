"""A loopback TCP proxy that can drop every connection and refuse new ones for a while.

Tests put it between a client and a real service (moto_server, mlflow server) to play "the
endpoint restarted" as the client sees it: open connections reset, new ones refused, then the
same address answers again with the data still there (a real S3 or MinIO keeps its objects
across a restart; moto would lose them). `upload_bytes_per_s` slows the client→server
direction so an upload is still in flight when the test cuts it.

Hand-written because the usual tool for this (toxiproxy) is a separate Go service; this needs
a page of sockets and threads.
"""
from __future__ import annotations

import socket
import threading
import time

from infra.s3_endpoint import free_port

CHUNK = 16 * 1024


class FaultProxy:
    def __init__(self, upstream_url: str, host: str = "127.0.0.1", upload_bytes_per_s: float | None = None) -> None:
        upstream = upstream_url.split("://", 1)[-1].rstrip("/")
        up_host, _, up_port = upstream.rpartition(":")
        self.upstream = (up_host, int(up_port))
        self.host, self.port = host, free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.upload_bytes_per_s = upload_bytes_per_s
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def cut(self) -> None:
        """Reset every open connection and stop listening: the endpoint is down."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            listener.close()
        for sock in sockets:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()  # linger 0: the peer sees a reset, as when a server process dies
            except OSError:
                pass

    def restore(self) -> None:
        """Listen again on the same port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut() closed the listener
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    client.close()
                    server.close()
                    return
                self._sockets.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upload: bool) -> None:
        try:
            while data := source.recv(CHUNK):
                if upload and self.upload_bytes_per_s:
                    time.sleep(len(data) / self.upload_bytes_per_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.difference_update((source, sink))
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
