#!/usr/bin/env python3
"""Traffic for tests/routes.rs (standard library only).

stream-server PORT
    Answers any request with `101 Switching Protocols`, then writes `tick N` lines
    every 100 ms until the client goes away: a long-lived upgraded (hijacked)
    connection through Caddy, like a WebSocket.

client ADDR PORT HOST_A HOST_B CAFILE STOPFILE OUTFILE
    Until STOPFILE exists, each in its own thread, against HOST_A (TLS verified
    against CAFILE) unless said otherwise:
    - new connections: a request per TLS connection, back to back (`requests`);
    - HTTP/1.1 keep-alive that never retries, as python-requests and most scripts
      behave: a failed request is a failure (`ka_*`);
    - HTTP/1.1 keep-alive that retries an idempotent request once on a new connection
      when a reused one closed before any byte of the answer, as RFC 9112 section 9.3.1
      allows and curl, browsers and Go do (`kr_*`; `kr_retried` counts the retries);
    - HTTP/2: curl with 50 requests on one connection per run (`h2_*`);
    - an upgraded stream to HOST_B held open; how often it broke (reconnecting each
      time) is counted. OUTFILE.ready appears once the stream is up.
    Then writes a JSON summary to OUTFILE. Bounded: at most 30 minutes.
"""
import http.client
import json
import os
import socket
import socketserver
import ssl
import subprocess
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
        "ka_requests": 0,
        "ka_failed": 0,
        "ka_failures": [],
        "kr_requests": 0,
        "kr_failed": 0,
        "kr_retried": 0,
        "kr_failures": [],
        "h2_requests": 0,
        "h2_failed": 0,
        "h2_failures": [],
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

    def count(prefix, ok, why):
        with lock:
            stats[prefix + "_requests"] += 1
            if not ok:
                stats[prefix + "_failed"] += 1
                if len(stats[prefix + "_failures"]) < 20:
                    stats[prefix + "_failures"].append(why)

    class Closed(Exception):
        """A reused connection closed before any byte of the answer came."""

    def keepalive(prefix, retry):
        conn, reused = None, False
        request = b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host_a.encode()

        def once(sock):
            try:
                sock.sendall(request)
                resp = http.client.HTTPResponse(sock)
                resp.begin()
            except (http.client.RemoteDisconnected, ConnectionError, ssl.SSLEOFError) as e:
                raise Closed(repr(e))
            body = resp.read()
            return resp.status == 200 and bool(body), resp.will_close

        while running():
            ok, why = False, ""
            try:
                if conn is None:
                    conn, reused = connect(host_a), False
                try:
                    ok, close = once(conn)
                except Closed as e:
                    conn.close()
                    conn = None
                    if not (retry and reused):
                        raise OSError(str(e))
                    with lock:
                        stats["kr_retried"] += 1
                    conn, reused = connect(host_a), False
                    ok, close = once(conn)
                why = "status not 200"
                reused = True
                if close:
                    conn.close()
                    conn = None
            except (OSError, ssl.SSLError, http.client.HTTPException, Closed) as e:
                why = repr(e)
                if conn is not None:
                    conn.close()
                conn = None
            count(prefix, ok, why)
        if conn is not None:
            conn.close()

    def http2():
        url = "https://%s:%d/" % (host_a, port)
        while running():
            out = subprocess.run(
                ["curl", "-s", "--http2", "--cacert", cafile, "-m", "10",
                 "--resolve", "%s:%d:%s" % (host_a, port, addr),
                 "-w", "%{http_code} %{http_version}\n"] + ["-o", "/dev/null", url] * 50,
                capture_output=True, text=True, timeout=60,
            )
            lines = out.stdout.split()
            codes = lines[0::2]
            for code, version in zip(codes, lines[1::2]):
                count("h2", code == "200" and version == "2", "%s over HTTP/%s" % (code, version))
            if len(codes) < 50:
                count("h2", False, "curl exit %d after %d answers" % (out.returncode, len(codes)))

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

    threads = [
        threading.Thread(target=requests),
        threading.Thread(target=keepalive, args=("ka", False)),
        threading.Thread(target=keepalive, args=("kr", True)),
        threading.Thread(target=http2),
        threading.Thread(target=stream),
    ]
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
