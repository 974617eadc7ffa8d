"""Internet-side witness of a replay: runs in the internet namespace (lab) or on the host
in front of the gateway's uplink, and keeps every frame arriving on one interface.

`python -m gateway.replay.sniffer --interface IF` prints `ready`, records until its
standard input closes (the runner closes it after the replay), then prints one JSON list
of `{"t": time, "data": base64 frame}`. The judge decides what is a bypass (judge.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def sniff_until_stdin_closes(interface: str) -> list[dict]:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((interface, 0))
    print("ready", flush=True)
    frames: list[dict] = []
    try:
        while True:
            readable, _, _ = select.select([sock, sys.stdin], [], [], 0.5)
            if sock in readable:
                data, addr = sock.recvfrom(65535)
                if addr[2] != PACKET_OUTGOING:
                    frames.append({"t": time.time(), "data": base64.b64encode(data).decode("ascii")})
            if sys.stdin in readable and not sys.stdin.readline():
                break
    finally:
        sock.close()
    return frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="record frames arriving on an interface until stdin closes")
    parser.add_argument("--interface", required=True)
    args = parser.parse_args(argv)
    frames = sniff_until_stdin_closes(args.interface)
    sys.stdout.write(json.dumps(frames) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
