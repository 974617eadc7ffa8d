#!/usr/bin/env bash
# Kanmon (関門) — one command from a fresh Debian/Ubuntu machine (run as root):
#
#   sudo ./bootstrap.sh demo      install what is needed, then run `kanmon demo`
#   sudo ./bootstrap.sh test      install what is needed, then run the whole test suite
#   sudo ./bootstrap.sh install   only install (system packages + .venv)
#
# System packages are installed with --no-install-recommends (wireguard-tools would otherwise
# pull in a kernel image) and without starting their services on this host (policy-rc.d):
# the tests start their own nginx, DNS, mail and ClamAV servers inside network namespaces.
set -euo pipefail

cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"

APT_PACKAGES=(
  python3-venv ca-certificates libjemalloc2
  iproute2 iputils-ping nftables conntrack curl procps
  wireguard-go wireguard-tools
  nginx-light
  systemd
  zbar-tools
  clamav clamav-daemon
  postfix dovecot-imapd dovecot-pop3d
  e2guardian
  chromium fonts-noto-cjk libnss3-tools
  prometheus
  postgresql
  wrk
)

say() { printf '\n== %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "root が必要です (sudo ./bootstrap.sh $1) / needs root: sudo ./bootstrap.sh $1" >&2
    exit 2
  fi
}

install_system_packages() {
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    say "system packages: all present"
    return
  fi
  say "installing system packages: ${missing[*]}"
  local guard=/usr/sbin/policy-rc.d created_guard=0
  if [ ! -e "$guard" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$guard"; chmod 755 "$guard"; created_guard=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  [ "$created_guard" -eq 1 ] && rm -f "$guard"
  return 0
}

install_node() {
  # The sign-in e2e tests run a real OIDC provider (npm oidc-provider, pinned by
  # gateway/lab/oidc/package-lock.json). Use the machine's Node.js if it has one.
  if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    say "node $(node --version) and npm $(npm --version 2>/dev/null) present"
    return
  fi
  say "installing Debian's nodejs and npm"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm
}

find_python() {
  # Python >= 3.12 (mitmproxy 12 needs it). Try the usual names, then pyenv's versions.
  local candidates=(python3.12 python3.13 python3)
  local c
  for c in "${candidates[@]}" /root/.pyenv/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9]; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys, venv; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}

install_python_env() {
  local py
  if ! py=$(find_python); then
    say "no Python >= 3.12 found; trying the distribution's python3.12"
    apt-get install -y -qq --no-install-recommends python3.12 python3.12-venv || true
    py=$(find_python) || { echo "Python 3.12+ が見つかりません / no Python >= 3.12 found" >&2; exit 1; }
  fi
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    say "creating $VENV with $py"
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
  fi
  say "installing Kanmon and its pinned dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test,bench]"
}

run_tests() {
  say "checking the layering contract (lint-imports, [tool.importlinter] in pyproject.toml)"
  (cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/lint-imports" --no-cache) || { echo "lint-imports: an import breaks the layers (ARCHITECTURE.md)" >&2; return 1; }
  say "running the test suite (unit + end-to-end in network namespaces)"
  mkdir -p "$ROOT/artifacts"
  set +e
  "$VENV/bin/python" -m pytest -p no:cacheprovider -q -rfEs --durations=25 "$@"
  local rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treated as a failure" >&2
    return 1
  fi
  return "$rc"
}

cmd=${1:-}
shift || true
case "$cmd" in
  install) need_root install; install_system_packages; install_node; install_python_env ;;
  demo)    need_root demo; install_system_packages; install_python_env; exec "$VENV/bin/kanmon" demo "$@" ;;
  test)    need_root test; install_system_packages; install_node; install_python_env; run_tests "$@" ;;
  *)
    echo "usage: sudo ./bootstrap.sh demo | test | install" >&2
    exit 2 ;;
esac
