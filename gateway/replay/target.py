"""Where a replay goes: the device (namespace, tunnel interface, addresses), the gateway's
log directory, and where the internet side can be watched.

Two sources:
- a lab state file (`replay-lab.json`, written by `write_lab_state` for a running
  `gateway.lab.topology.Lab`): namespaces and interfaces of every lab device and of the
  internet namespace;
- a gateway configuration (`--config C --device ID`): addresses from the device registry,
  state directory, prefixes and upstream resolvers from the config; the device namespace
  (`--device-netns`, or the current one) and an optional internet-side interface to watch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LAB_STATE_FILE = "replay-lab.json"


class TargetError(Exception):
    pass


@dataclass(frozen=True)
class ReplayTarget:
    device_id: str
    device_ipv4: str
    device_ipv6: str | None
    wg_interface: str
    state_dir: str
    device_netns: str | None = None          # None: the current namespace
    internet_netns: str | None = None
    internet_interface: str | None = None    # None: the internet side is not watched
    uplink_addresses: tuple[str, ...] = ()
    upstream_dns: tuple[str, ...] = ()
    tunnel_prefixes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def device_sources(self) -> dict[int, str]:
        out = {4: self.device_ipv4}
        if self.device_ipv6:
            out[6] = self.device_ipv6
        return out


def write_lab_state(lab: Any, directory: str | Path | None = None) -> Path:
    """Describe a built lab (gateway.lab.topology.Lab) for `kanmon replay --lab-state DIR`."""
    from gateway.lab import topology as t
    directory = Path(directory or lab.workdir)
    state = {
        "state_dir": str(lab.state_dir),
        "internet_netns": lab.inet.name,
        "internet_interface": f"{lab.prefix}u1",
        "uplink_addresses": [t.UPLINK_GW4, t.UPLINK_GW6],
        "upstream_dns": [t.DNS4],
        "tunnel_prefixes": [t.TUNNEL4, t.TUNNEL6],
        "devices": {d.device_id: {"netns": d.ns.name, "interface": d.wg_interface, "ipv4": d.ipv4, "ipv6": d.ipv6}
                    for d in lab.devices},
    }
    path = directory / LAB_STATE_FILE
    path.write_text(json.dumps(state, indent=1))
    return path


def target_from_lab_state(directory: str | Path, device_id: str | None) -> ReplayTarget:
    path = Path(directory)
    if path.is_dir():
        path = path / LAB_STATE_FILE
    try:
        state = json.loads(path.read_text())
        devices = state["devices"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TargetError(f"{path}: not a lab state file ({exc})") from None
    if not devices:
        raise TargetError(f"{path}: the lab has no devices")
    device_id = device_id or sorted(devices)[0]
    if device_id not in devices:
        raise TargetError(f"{path}: no device {device_id!r} (devices: {', '.join(sorted(devices))})")
    d = devices[device_id]
    return ReplayTarget(device_id, d["ipv4"], d.get("ipv6"), d["interface"], state["state_dir"], d["netns"],
                        state.get("internet_netns"), state.get("internet_interface"),
                        tuple(state.get("uplink_addresses", ())), tuple(state.get("upstream_dns", ())),
                        tuple(state.get("tunnel_prefixes", ())))


def target_from_config(config_path: str | Path, device_id: str, *, interface: str | None, device_netns: str | None,
                       internet_netns: str | None, internet_interface: str | None,
                       uplink_addresses: tuple[str, ...] = ()) -> ReplayTarget:
    from gateway.config import load_config
    from gateway.registry.factory import open_registry
    from gateway.yamlsource import SourceErrors
    try:
        cfg = load_config(config_path)
    except SourceErrors as exc:
        raise TargetError(str(exc)) from None
    registry = open_registry(cfg)      # the registry the config selects (SQLite or PostgreSQL)
    try:
        record = registry.get(device_id)
    finally:
        registry.close()
    if record is None:
        raise TargetError(f"no device {device_id!r} in the registry of {config_path}")
    prefixes = [str(cfg.ipv4_prefix)] + ([str(cfg.ipv6_prefix)] if cfg.ipv6_prefix else [])
    return ReplayTarget(device_id, str(record.ipv4), str(record.ipv6) if record.ipv6 else None,
                        interface or "wg0", str(cfg.state_dir), device_netns, internet_netns, internet_interface,
                        tuple(uplink_addresses), tuple(cfg.upstream_dns), tuple(prefixes))


def describe(target: ReplayTarget) -> dict[str, Any]:
    return asdict(target)

