#!/usr/bin/env python3
"""Traffic for tests/routes.rs (standard library only).

stream-server PORT
    Answers any request with `101 Switching Protocols`, then writes `tick N` lines
    every 100 ms until the client goes away: a long-lived upgraded (hijacked)
    connection through Caddy, like a WebSocket.

client ADDR PORT HOST_A HOST_B CAFILE STOPFILE OUTFILE
    Until STOPFILE exists: one thread sends requests to HOST_A back to back (a new
    TLS connection each, verified against CAFILE) and counts failures; another holds
    an upgraded stream to HOST_B open and counts how often it broke (reconnecting
    each time); OUTFILE.ready appears once the stream is up. Then writes a JSON summary to OUTFILE. Bounded: at most 30 minutes.
"""
import json
import os
import socket
import socketserver
import ssl
import sys
import threading
import time


def stream_server(port):
    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = self.request.recv(4096)
                if not chunk:
                    return
                data += chunk
            self.request.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\n"
                b"Connection: Upgrade\r\nUpgrade: converge-test\r\n\r\n"
            )
            n = 0
            try:
                while True:
                    self.request.sendall(b"tick %d\n" % n)
                    n += 1
                    time.sleep(0.1)
            except OSError:
                return

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    with Server(("0.0.0.0", port), Handler) as srv:
        srv.serve_forever()


def client(addr, port, host_a, host_b, cafile, stopfile, outfile):
    ctx = ssl.create_default_context(cafile=cafile)
    deadline = time.monotonic() + 1800
    stats = {
        "requests": 0,
        "failed": 0,
        "failures": [],
        "stream_connects": 0,
        "stream_broken": 0,
        "stream_lines": 0,
        "breaks": [],
    }
    lock = threading.Lock()

    def running():
        return not os.path.exists(stopfile) and time.monotonic() < deadline

    def connect(host):
        raw = socket.create_connection((addr, port), timeout=10)
        return ctx.wrap_socket(raw, server_hostname=host)

    def requests():
        while running():
            ok, why = False, ""
            try:
                with connect(host_a) as s:
                    s.sendall(
                        b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                        % host_a.encode()
                    )
                    data = b""
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                ok = data.startswith(b"HTTP/1.1 200")
                why = "response %r" % data[:60]
            except (OSError, ssl.SSLError) as e:
                why = repr(e)
            with lock:
                stats["requests"] += 1
                if not ok:
                    stats["failed"] += 1
                    if len(stats["failures"]) < 20:
                        stats["failures"].append(why)

    def stream():
        while running():
            try:
                with connect(host_b) as s:
                    s.sendall(
                        b"GET /stream HTTP/1.1\r\nHost: %s\r\n"
                        b"Connection: Upgrade\r\nUpgrade: converge-test\r\n\r\n"
                        % host_b.encode()
                    )
                    f = s.makefile("rb")
                    status = f.readline()
                    if not status.startswith(b"HTTP/1.1 101"):
                        raise OSError("no upgrade: %r" % status)
                    while f.readline() not in (b"\r\n", b""):
                        pass
                    with lock:
                        stats["stream_connects"] += 1
                    if not os.path.exists(outfile + ".ready"):
                        open(outfile + ".ready", "w").close()
                    s.settimeout(5)
                    while running():
                        line = f.readline()
                        if not line:
                            raise OSError("stream closed")
                        with lock:
                            stats["stream_lines"] += 1
                    return
            except (OSError, ssl.SSLError) as e:
                if not running():
                    return
                with lock:
                    stats["stream_broken"] += 1
                    if len(stats["breaks"]) < 20:
                        stats["breaks"].append(repr(e))
                time.sleep(0.2)

    threads = [threading.Thread(target=requests), threading.Thread(target=stream)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tmp = outfile + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.rename(tmp, outfile)


if __name__ == "__main__":
    if sys.argv[1] == "stream-server":
        stream_server(int(sys.argv[2]))
    elif sys.argv[1] == "client":
        client(sys.argv[2], int(sys.argv[3]), *sys.argv[4:9])
    else:
        sys.exit("usage: see the module docstring")
