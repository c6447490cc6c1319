#!/usr/bin/env bash
# Tools some tests drive, from Debian's packages where this runs as root with apt (as CI does):
# chromium for the trigger-form test (through Playwright; `playwright install` would download a
# browser, which this project does not rely on), and the docker-compose client, which checks
# docker/compose.yaml with `config` (no Docker engine needed). Elsewhere those tests are skipped.
set -euo pipefail
missing=()
[ -x "${RUBBERBAND_CHROMIUM:-/usr/bin/chromium}" ] || missing+=(chromium)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
else
  echo "install-test-tools: ${missing[*]} missing and no root apt-get: the tests that need them are skipped" >&2
fi
