"""Packet replay: feed recorded device traffic through a real tunnel and check each verdict.

`kanmon replay CAPTURE --expect EXPECT.yaml` takes the device-side packets of a capture,
injects them into one device's WireGuard tunnel (from the device's network namespace), lets
the gateway handle them, and compares the outcome of every flow with the expectation file.

Design (why TCP and UDP are replayed differently)
-------------------------------------------------
TCP cannot be replayed packet by packet against a live proxy: the proxy's transparent
listener picks its own initial sequence number, so every recorded segment after the SYN
would carry acknowledgement and sequence numbers the live connection never agreed to, and
the device's own kernel would reset the connection it does not know about. TCP flows are
therefore replayed **at the flow level**: each client->server byte stream is reassembled
from the capture (scapy parses; reassembly by sequence offset handles out-of-order and
retransmitted segments) and its bytes are sent again over a real socket opened from the
device namespace to the same destination address and port, bound to the recorded source
port (so the gateway's `conn`/`proxy` records name the flow). For TLS the recorded
ClientHello bytes are sent, so the SNI decision is exercised exactly as recorded. What comes
back is classified: HTTP status and `X-Kanmon-Rule` header, a TLS handshake or alert, a
reset, a refused connection, silence.

Everything else — UDP (DNS, QUIC, other ports) and packets that are odd on purpose (IP
fragments, overlapping fragments, SYN with data, RST storms, spoofed source addresses,
oversized and truncated packets, non-IP bytes) — is replayed **packet by packet**: the
recorded bytes are written to the device's tunnel interface with an AF_PACKET socket (only
the source address is rewritten to the replaying device's, when the capture was made by
another), and the replies arriving on the same interface are attributed back to the flow.

The invariant checked for every replay, whatever the expectations say: **nothing reaches the
internet except through the proxy**. A sniffer in the internet namespace (lab) records every
IP packet arriving from the gateway's uplink during the replay. A packet is a *bypass* when
its source is not one of the gateway's uplink addresses (e.g. a device tunnel address), when
it is UDP that is not a DNS query the gateway's DNS log explains, or when it opens a TCP
connection that no passing `proxy`/`conn` record explains.

Modules: `capture` (pcap -> flows, pure), `expectations` (YAML), `judge` (results + logs ->
outcomes, bypass analysis, pure), `inject` and `sniffer` (run inside namespaces),
`target` (which device/namespaces/state directory), `runner` (orchestration), `record`
(`--record`), `policydiff` (`policy diff --pcap`), `commands` (CLI).
"""
