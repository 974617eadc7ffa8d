"""Issue #16: the addon chain is built in one place (addons/chain.py). `kanmon run` uses it
(GatewayApp.build_chain), and the order that decides verdicts is checked here; the e2e lab's
gateway logs the chain it runs and tests/e2e/test_gateway_dataplane.py compares it."""

from __future__ import annotations

import pytest

from addons.chain import ChainError, ChainParts, build_chain, chain_names, layer_decision
from addons.cutoff import ConnectionCutter
from addons.failclosed import Guarded
from addons.identity import DeviceDirectory
from addons.protocol import ProtocolIdentifier
from gateway.config import load_config
from gateway.logstore import LogStore
from gateway.metrics import GatewayMetrics
from gateway.proxy.connections import LiveConnections
from gateway.proxy.dnsbinding import DnsBindings

PRODUCTION_ORDER = ["DeviceIdentity", "DeviceLimits", "RequestAuthority", "HostRuleDecider", "NoInspectBinding",
                    "DnsBypassGuard", "QuarantineGate", "Enforcer", "AccessLog", "ConnectionCutter"]


class ExtraAddon:
    """An operator extra (addons.extra in the config)."""


def chain_parts(cfg, tmp_path) -> ChainParts:
    """The parts a gateway without a policy file, mail or sign-in gives the builder."""
    failures: list[str] = []
    return ChainParts(cfg, LiveConnections(), DeviceDirectory(), GatewayMetrics(), LogStore(tmp_path / "logs"),
                      ConnectionCutter(), [], DnsBindings(), failures.append)


def write_config(tmp_path, extra: str = ""):
    path = tmp_path / "kanmon.yaml"
    path.write_text(f"""
state_dir: {tmp_path / 'state'}
tunnel: {{interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24, endpoint: "vpn.example.test:51820"}}
uplink: {{interface: eth0}}
{extra}
""")
    return load_config(path)


def test_the_production_order_every_addon_guarded(tmp_path):
    chain = build_chain(chain_parts(write_config(tmp_path), tmp_path))
    assert chain_names(chain) == PRODUCTION_ORDER
    assert all(isinstance(addon, Guarded) for addon in chain)


def test_operator_extras_decide_after_the_builtin_deciders_and_before_the_enforcer(tmp_path):
    cfg = write_config(tmp_path, "addons: {extra: ['tests.unit.test_chain:ExtraAddon']}")
    names = chain_names(build_chain(chain_parts(cfg, tmp_path)))
    assert names.index("DnsBypassGuard") < names.index("ExtraAddon") < names.index("QuarantineGate")
    assert names[-3:] == ["Enforcer", "AccessLog", "ConnectionCutter"]


def test_an_extra_that_does_not_load_stops_the_build(tmp_path):
    cfg = write_config(tmp_path, "addons: {extra: ['tests.unit.test_chain:Missing']}")
    with pytest.raises(ChainError, match="cannot load tests.unit.test_chain:Missing"):
        build_chain(chain_parts(cfg, tmp_path))


def test_the_gateway_process_builds_the_same_chain(tmp_path):
    from gateway.runtime.app import GatewayApp

    cfg = write_config(tmp_path)
    app = GatewayApp(cfg)
    app.logstore = LogStore(tmp_path / "app-logs")
    assert chain_names(app.build_chain()) == PRODUCTION_ORDER
    assert isinstance(layer_decision(app.chain_parts()), ProtocolIdentifier)
