"""`kanmon replay --record`: capture a device's tunnel traffic into a pcap that `kanmon
replay` accepts. Runs in the device's namespace (the CLI starts it with `ip netns exec`).

`python -m gateway.replay.record --interface IF --out FILE.pcap --seconds N` writes both
directions at the IP level (LINKTYPE_RAW); replay keeps only what the device sent.
Equivalent recipe without Kanmon: `ip netns exec NS tcpdump -i IF -w FILE.pcap`.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time

from gateway.replay.inject import ETH_P_ALL

LINKTYPE_RAW = 101


def record(interface: str, out: str, seconds: float) -> int:
    from scapy.utils import RawPcapWriter
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sock.bind((interface, 0))
    sock.settimeout(0.2)
    writer = RawPcapWriter(out, linktype=LINKTYPE_RAW)
    writer.write_header(None)  # also when nothing arrives: an empty capture is still a capture
    stop = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    print("recording", flush=True)
    count, deadline = 0, time.monotonic() + seconds
    try:
        while not stop["now"] and time.monotonic() < deadline:
            try:
                data = sock.recv(65535)
            except socket.timeout:
                continue
            now = time.time()
            writer.write_packet(data, sec=int(now), usec=int((now % 1) * 1e6))
            count += 1
    finally:
        writer.close()
        sock.close()
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="record a tunnel interface into a pcap")
    parser.add_argument("--interface", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    count = record(args.interface, args.out, args.seconds)
    print(f"packets {count}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
