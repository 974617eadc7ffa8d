"""mTLS enrollment endpoint (issue #3): `decide` (pure decisions), `ratelimit` (token
buckets), `servercert` (the endpoint's TLS identity), `server` (TLS + HTTP/1.1 in a thread)."""
