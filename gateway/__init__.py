"""Kanmon (関門): network-edge enforcement gateway.

Data path, one module per step:
packet -> tunnel identity (tunnel.py, steering.py) -> device record (registry.py)
-> policy snapshot (policy/) -> verdict (verdict.py) -> action (addons/) -> log/metric.
"""

__version__ = "0.1.0"
