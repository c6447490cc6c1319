#!/usr/bin/env bash
# The browser the trigger-form test drives (Playwright with Debian's chromium; `playwright install`
# would download one, which this project does not rely on). Installs it with apt where it can.
set -euo pipefail
browser="${RUBBERBAND_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$browser" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
else
  echo "install-chromium: no $browser and no root apt-get: the trigger-form test will be skipped" \
       "(install chromium, or set RUBBERBAND_CHROMIUM to a Chromium binary)" >&2
fi
