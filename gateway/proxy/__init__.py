"""The proxy layer: mitmproxy in the gateway process (`master`), its DNS datagram listener,
the live connections table every addon shares, and the byte-level parsers the addons judge
with (`firstbytes`: which protocol; `authority`: which host; `dnsbinding`: which address the
resolver gave). The addon chain itself is addons/chain.py."""
