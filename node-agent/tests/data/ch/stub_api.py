#!/usr/bin/env python3
# What the cloud-hypervisor stand-ins of vmm_ch_machine.rs and
# vmm_process.rs share (each appends its own answers): the `--version`
# answer, the API listener CH is handed as `--api-socket fd=N`, and one
# request per connection read whole (head, then Content-Length bytes).
import json, os, socket, sys

args = sys.argv[1:]
if args == ["--version"]:
    print("cloud-hypervisor v53.0-stub"); print("Migration Protocol Versions: 0"); sys.exit(0)

def flag(name):
    """The value of `name value=...` on the command line."""
    return args[args.index(name) + 1].split("=", 1)[1]

def requests():
    """Each request as (connection, method, endpoint, body); the
    connection is closed when the next one is asked for."""
    srv = socket.socket(fileno=int(flag("--api-socket")))
    while True:
        conn, _ = srv.accept()
        req = b""
        while b"\r\n\r\n" not in req:
            chunk = conn.recv(65536)
            if not chunk: break
            req += chunk
        head, _, body = req.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length": length = int(v)
        while len(body) < length:
            body += conn.recv(65536)
        method, path = head.split(b" ")[0].decode(), head.split(b" ")[1].decode()
        yield conn, method, path.rsplit("/", 1)[1], body
        conn.close()

def reply(conn, code, body=b""):
    ctype = b"Content-Type: application/json\r\n" if body else b""
    conn.sendall(b"HTTP/1.1 %d \r\n%sContent-Length: %d\r\n\r\n" % (code, ctype, len(body)) + body)

