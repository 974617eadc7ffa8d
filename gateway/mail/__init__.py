"""Mail filter core: the verdict engine, its checks and the protocol adapters (no network I/O
except the adapters' scanners). A regular package so packaging and the import contract see it."""
