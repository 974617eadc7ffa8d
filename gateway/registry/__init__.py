"""The device registry: the model every layer shares (`model`), its adapters (`sqlite`, the
embedded default; `postgres`, shared by a cluster), the outage view of a cluster node
(`outbox`) and the one factory that opens whichever the config selects (`factory`)."""
