"""Download scanning (issue #18): content sniffing of risky file kinds, the clamd INSTREAM
protocol (sans-io, shared with the mail filter) and its asyncio client."""
