#!/usr/bin/env python3
# tokengate test upstream: answers every request 200 with JSON of exactly what it received.
"""Echo upstream for the tokengate gateway (stdlib only).

Usage: python3 envoy/echo_upstream.py [PORT]   (default 8081, always 127.0.0.1)

Every request, whatever the method, gets 200 and a JSON body
    {"method": "...", "path": "...", "headers": [[name, value], ...]}
holding the raw request line's method and target and every header pair in the order
received, repeats kept (values decoded as latin-1, so no byte is lost). A request body is
read and discarded. The same JSON, base64-encoded, is also in the `x-echo` response header,
so a HEAD request shows what reached the upstream too. Threaded; logs nothing.
"""

import base64
import http.client
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The stdlib answers 431 past 100 header lines; let Envoy's own limits be the ones tested.
http.client._MAXHEADERS = 1000


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream pool expects
    disable_nagle_algorithm = True  # else headers and body as two writes cost a 40 ms delayed ACK

    def _echo(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": [[name, value] for name, value in self.headers.raw_items()],
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("x-echo", base64.b64encode(body).decode())
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def __getattr__(self, name):
        # do_GET, do_POST, do_ANYTHING: every method echoes.
        if name.startswith("do_"):
            return self._echo
        raise AttributeError(name)

    def log_message(self, *_):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8081
    server = Server(("127.0.0.1", port), Echo)
    print(f"echo upstream on 127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
