"""A hostile MySQL server for one test: it accepts any login, and answers
every COM_QUERY with a request for a client file (the LOCAL INFILE
request, 0xFB + file name), as a compromised or impostor server may at any
time. What the client side sends back is appended to OUT (one line per
request: the file name, a tab, the bytes received, hex-encoded), then the
command is answered with an OK. A real server never does this unasked, so
the test needs this one.

    python3 hostile_mysql_server.py PORT FILE_TO_ASK_FOR OUT
"""

import socket
import struct
import sys

# PROTOCOL_41, SECURE_CONNECTION, PLUGIN_AUTH, LOCAL_FILES, TRANSACTIONS,
# CONNECT_WITH_DB, MULTI_RESULTS (no CLIENT_MYSQL bit: it reads as MariaDB).
CAPABILITIES = 0x200 | 0x8000 | 0x80000 | 0x80 | 0x2000 | 0x8 | 0x20000


def send(conn, seq, payload):
    conn.sendall(struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload)


def receive(conn):
    header = read_exactly(conn, 4)
    if header is None:
        return None, None
    length = header[0] | header[1] << 8 | header[2] << 16
    return header[3], read_exactly(conn, length)


def read_exactly(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def ok(seq):
    return seq, b"\x00\x00\x00\x02\x00\x00\x00"


def greeting():
    scramble = b"abcdefghijklmnopqrst"
    return (
        b"\x0a"
        + b"10.11.0-hostile\x00"
        + struct.pack("<I", 42)
        + scramble[:8]
        + b"\x00"
        + struct.pack("<H", CAPABILITIES & 0xFFFF)
        + bytes([45])
        + struct.pack("<H", 2)
        + struct.pack("<H", CAPABILITIES >> 16)
        + bytes([21])
        + b"\x00" * 10
        + scramble[8:]
        + b"\x00"
        + b"mysql_native_password\x00"
    )


def serve(conn, asked, out):
    send(conn, 0, greeting())
    seq, _answer = receive(conn)
    if seq is None:
        return
    send(conn, *ok(seq + 1))
    while True:
        seq, command = receive(conn)
        if command is None or command[:1] == b"\x01":
            return
        if command[:1] != b"\x03":
            send(conn, *ok(seq + 1))
            continue
        send(conn, seq + 1, b"\xfb" + asked.encode())
        received = b""
        last = seq + 1
        while True:
            last, chunk = receive(conn)
            if chunk is None:
                return
            if not chunk:
                break
            received += chunk
        with open(out, "a") as f:
            f.write(f"{asked}\t{received.hex()}\n")
        send(conn, *ok(last + 1))


def main():
    port, asked, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(8)
    while True:
        conn, _ = listener.accept()
        try:
            serve(conn, asked, out)
        except OSError:
            pass
        finally:
            conn.close()


main()
