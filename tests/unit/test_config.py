"""Gateway config: valid files load; every mistake is named with file:line and key."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from gateway.config import load_config_text
from gateway.verdict import Action
from gateway.yamlsource import SourceErrors

VALID = textwrap.dedent("""\
    node:
      name: tokyo-1
    state_dir: /var/lib/kanmon
    tunnel:
      interface: kmwg0
      listen_port: 51820
      ipv4_prefix: 10.77.0.0/24
      ipv6_prefix: fd77:77::/64
    uplink:
      interface: eth0
    proxy:
      upstream_dns: [192.0.2.53]
    management:
      listen: 127.0.0.1:9180
    rules:
      default_action: block
      list:
        - id: allow-intranet
          action: allow
          hosts: [intranet.example.jp, .example.jp]
    """)


def errors_of(text: str) -> list[str]:
    with pytest.raises(SourceErrors) as exc:
        load_config_text(text, "k.yaml")
    return [str(e) for e in exc.value.errors]


def test_valid_config_derives_addresses_and_rules():
    cfg = load_config_text(VALID, "k.yaml")
    assert cfg.gateway_ipv4 == ipaddress.ip_address("10.77.0.1")
    assert cfg.gateway_ipv6 == ipaddress.ip_address("fd77:77::1")
    assert cfg.nft_table == "kanmon_tokyo_1"
    assert cfg.default_action is Action.BLOCK
    rule = cfg.host_rules[0]
    assert rule.matches("intranet.example.jp") and rule.matches("www.example.jp") and rule.matches("example.jp")
    assert not rule.matches("example.jp.evil.test") and not rule.matches("notexample.jp")
    assert cfg.connection_strategy == "lazy"


def test_schema_errors_name_key_and_line():
    bad = VALID.replace("listen_port: 51820", "listen_port: 70000").replace("name: tokyo-1", "name: Tokyo 1")
    errs = errors_of(bad + "extra_key: 1\n")
    assert any(e.startswith("k.yaml:6: tunnel.listen_port:") and "70000" in e for e in errs)
    assert any(e.startswith("k.yaml:2: node.name:") for e in errs)
    assert any(e.startswith("k.yaml:21: extra_key: 不明なキーです") and " / unknown key" in e for e in errs)


def test_semantic_errors_name_key_and_line():
    bad = (VALID.replace("ipv4_prefix: 10.77.0.0/24", "ipv4_prefix: fd00::/64")
                .replace("upstream_dns: [192.0.2.53]", "upstream_dns: [resolver.example]")
                .replace("listen: 127.0.0.1:9180", "listen: localhost"))
    errs = errors_of(bad)
    assert "k.yaml:7: tunnel.ipv4_prefix: IPv4 のプレフィックスにしてください / must be an IPv4 prefix" in errs
    assert ("k.yaml:12: proxy.upstream_dns[0]: 'resolver.example' は IP アドレスではありません / "
            "'resolver.example' is not an IP address") in errs
    assert any(e.startswith("k.yaml:14: management.listen:") for e in errs)


def test_host_bits_in_prefix_and_duplicate_rule_ids_are_refused():
    text = VALID.replace("10.77.0.0/24", "10.77.0.5/24") + "    - id: allow-intranet\n      action: block\n      hosts: [x.test]\n"
    errs = errors_of(text)
    assert any(e.startswith("k.yaml:7: tunnel.ipv4_prefix: ネットワークとして正しくありません") and "/ not a valid network" in e
               for e in errs)
    assert any(e.startswith("k.yaml:21: rules.list[1].id: ルール ID が重複しています") and "/ duplicate rule id" in e
               for e in errs)


def test_yaml_syntax_and_duplicate_keys():
    assert errors_of("tunnel: [\n")[0].startswith("k.yaml:2: YAML の構文エラーです") and "YAML syntax error" in errors_of("tunnel: [\n")[0]
    errs = errors_of(VALID.replace("uplink:\n  interface: eth0\n", "uplink:\n  interface: eth0\n  interface: eth1\n"))
    assert errs == ["k.yaml:11: uplink.interface: 重複したキーです（最初は 10 行目） / duplicate key (first defined on line 10)"]


def test_not_a_mapping():
    assert errors_of("- a\n- b\n") == ["k.yaml:1: 設定はキーと値の組（マッピング）で書いてください / "
                                       "the configuration must be a mapping of keys"]


def test_shipped_example_config_is_valid():
    from pathlib import Path

    from gateway.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "systemd" / "kanmon.yaml.example")
    # issue #17: the example enforces the shipped policy, not the built-in host filter
    assert cfg.wg_interface == "kmwg0" and cfg.policy_path == Path("/opt/kanmon/policies/example.yaml")


def test_firewall_log_settings_default_and_bounds():
    cfg = load_config_text(VALID, "k.yaml")
    assert (cfg.firewall_log_group, cfg.firewall_log_interval) == (7, 10.0)
    cfg = load_config_text(VALID + "logs:\n  firewall_group: 42\n  firewall_interval: 30\n", "k.yaml")
    assert (cfg.firewall_log_group, cfg.firewall_log_interval) == (42, 30.0)
    errs = errors_of(VALID + "logs:\n  firewall_group: 0\n  firewall_interval: 0.5\n")
    assert any(e.startswith("k.yaml:22: logs.firewall_group:") for e in errs), errs
    assert any(e.startswith("k.yaml:23: logs.firewall_interval:") for e in errs), errs
