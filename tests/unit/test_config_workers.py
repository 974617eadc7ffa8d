"""issue #22: `proxy.workers: auto | N` -- parsed, bounded, ports checked, errors in both languages."""

from __future__ import annotations

import pytest

from gateway.config import MAX_PROXY_WORKERS, load_config_text, usable_cores
from gateway.yamlsource import SourceErrors
from tests.unit.test_config import VALID


def with_proxy(extra: str) -> str:
    return VALID.replace("  upstream_dns: [192.0.2.53]\n", "  upstream_dns: [192.0.2.53]\n" + extra)


def errors_of(text: str) -> list[str]:
    with pytest.raises(SourceErrors) as exc:
        load_config_text(text, "k.yaml")
    return [str(e) for e in exc.value.errors]


def test_default_is_one_worker_per_usable_core():
    # issue #22: `auto` by default, since sign-in and auto-quarantine follow the workers too
    assert load_config_text(VALID, "k.yaml").proxy_workers == min(usable_cores(), MAX_PROXY_WORKERS)
    assert load_config_text(with_proxy("  workers: 1\n"), "k.yaml").proxy_workers == 1


def test_a_number_and_auto():
    assert load_config_text(with_proxy("  workers: 3\n"), "k.yaml").proxy_workers == 3
    auto = load_config_text(with_proxy("  workers: auto\n"), "k.yaml").proxy_workers
    assert auto == min(usable_cores(), MAX_PROXY_WORKERS) and auto >= 1


@pytest.mark.parametrize("value", ["0", "-1", "65", "two", "1.5", "true", "[2]", "null"])
def test_bad_values_are_refused_with_key_and_both_languages(value):
    errs = errors_of(with_proxy(f"  workers: {value}\n"))
    assert len(errs) == 1, errs
    err = errs[0]
    assert err.startswith("k.yaml:13: proxy.workers:"), err
    assert "auto" in err and "1〜64" in err and "from 1 to 64" in err


def test_worker_ports_must_not_overlap_or_overflow():
    errs = errors_of(with_proxy("  workers: 4\n  transparent_port: 8080\n  dns_port: 8082\n"))
    assert any("proxy.workers" in e and "8080-8083" in e and "8082-8085" in e and "重なります" in e for e in errs), errs
    errs = errors_of(with_proxy("  workers: 4\n  transparent_port: 65534\n  dns_port: 8053\n"))
    assert any("proxy.workers" in e and "65535" in e and "exceed" in e for e in errs), errs
    # two workers on the default ports (8080-8081, 8053-8054) are fine
    assert load_config_text(with_proxy("  workers: 2\n"), "k.yaml").proxy_workers == 2


def test_enrollment_port_may_not_take_a_workers_port():
    text = with_proxy("  workers: 2\n") + "enrollment:\n  listen: 0.0.0.0:8081\n"
    assert any("enrollment.listen" in e for e in errors_of(text))


def test_signin_and_auto_quarantine_are_accepted_with_several_workers():
    # issue #22: both follow the workers now (gateway/runtime/workers.py); once refused here
    signin = ("signin:\n  issuer: https://idp.example.jp\n  client_id: kanmon\n  client_secret: s3cret\n"
              "  portal_host: signin.kanmon.internal\n")
    cfg = load_config_text(with_proxy("  workers: 2\n") + "auto_quarantine: {}\n" + signin, "k.yaml")
    assert cfg.proxy_workers == 2
    assert cfg.auto_quarantine is not None and cfg.signin is not None
    assert cfg.signin.portal_host == "signin.kanmon.internal"
