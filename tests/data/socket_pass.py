#!/usr/bin/env python3
"""A TCP socket created in one process and connected in another.

  send-socket UNIX_PATH
      Creates an unconnected TCP socket and passes it (SCM_RIGHTS) to
      whoever listens on UNIX_PATH.
  connect-received UNIX_PATH HOST PORT MARKER
      Listens on UNIX_PATH, receives one socket, connects it to HOST:PORT
      and runs `select 'MARKER'` over the PostgreSQL protocol.
  inherit -- COMMAND...
      Creates an unconnected TCP socket, leaves it open across exec and
      runs COMMAND with every "{fd}" replaced by its number.
  connect-fd FD HOST PORT MARKER
      Connects the inherited socket FD and runs the query.
  connect-new HOST PORT MARKER
      Creates a TCP socket (IPv6 when HOST has a colon), connects it and
      runs the query.

With HOLD_SECONDS set, waits that long before exiting, so that the process
is still there to be looked at.

Prints "connect-error ERRNO" and exits 3 when connect fails, prints
"result VALUE" and exits 0 when the query answers.
"""
import array
import errno
import os
import socket
import struct
import sys
import time


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the server closed the connection")
        data += chunk
    return data


def read_until_ready(sock):
    rows = []
    while True:
        tag = recv_exact(sock, 1)
        (length,) = struct.unpack("!I", recv_exact(sock, 4))
        payload = recv_exact(sock, length - 4)
        if tag == b"E":
            raise RuntimeError("server error: %r" % payload)
        if tag == b"D":
            (count,) = struct.unpack("!H", payload[:2])
            if count >= 1:
                (size,) = struct.unpack("!i", payload[2:6])
                rows.append(payload[6 : 6 + size].decode())
        if tag == b"Z":
            return rows


def query(sock, marker):
    params = b"user\0postgres\0database\0postgres\0\0"
    body = struct.pack("!I", 196608) + params
    sock.sendall(struct.pack("!I", len(body) + 4) + body)
    read_until_ready(sock)
    text = ("select '%s'" % marker).encode() + b"\0"
    sock.sendall(b"Q" + struct.pack("!I", len(text) + 4) + text)
    return read_until_ready(sock)


def connect_and_query(sock, host, port, marker):
    try:
        sock.connect((host, int(port)))
    except OSError as e:
        print("connect-error %s" % errno.errorcode.get(e.errno, e.errno), flush=True)
        hold()
        sys.exit(3)
    print("connected", flush=True)
    for row in query(sock, marker):
        print("result %s" % row, flush=True)
    sock.close()
    hold()


def hold():
    time.sleep(float(os.environ.get("HOLD_SECONDS", "0")))


def send_socket(path):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    deadline = time.time() + 10
    while True:
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            unix.connect(path)
            break
        except OSError:
            unix.close()
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    fds = array.array("i", [tcp.fileno()])
    unix.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    unix.recv(1)
    print("sent", flush=True)


def connect_received(path, host, port, marker):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    # The sender may fail; never wait for it forever.
    listener.settimeout(20)
    conn, _ = listener.accept()
    fds = array.array("i")
    _, ancillary, _, _ = conn.recvmsg(1, socket.CMSG_LEN(fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: fds.itemsize])
    if not fds:
        print("no socket received", flush=True)
        sys.exit(4)
    conn.sendall(b"k")
    sock = socket.socket(fileno=fds[0])
    connect_and_query(sock, host, port, marker)


def inherit(command):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.set_inheritable(True)
    fd = str(tcp.fileno())
    args = [a.replace("{fd}", fd) for a in command]
    os.execvp(args[0], args)


def main(argv):
    mode = argv[1]
    if mode == "send-socket":
        send_socket(argv[2])
    elif mode == "connect-received":
        connect_received(*argv[2:6])
    elif mode == "inherit":
        sep = argv.index("--")
        inherit(argv[sep + 1 :])
    elif mode == "connect-fd":
        sock = socket.socket(fileno=int(argv[2]))
        connect_and_query(sock, *argv[3:6])
    elif mode == "connect-new":
        family = socket.AF_INET6 if ":" in argv[2] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        connect_and_query(sock, *argv[2:5])
    else:
        print("unknown mode %s" % mode, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv)
