#!/usr/bin/env bash
# Debian packages the tests use beyond Python: ffmpeg (M4A/AAC decoding), prometheus (promtool and the
# server for the observability tests), chromium + chromium-driver (the web page's browser test), fluidsynth and
# a General MIDI SoundFont (the analysis accuracy corpus). RabbitMQ, Redis and MongoDB are handled by stemflow_dev.stack.
set -euo pipefail
declare -A wanted=([ffmpeg]=ffmpeg [promtool]=prometheus [prometheus]=prometheus [chromium]=chromium [chromedriver]=chromium-driver [fluidsynth]=fluidsynth)
missing=()
for cmd in "${!wanted[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
done
[ -e /usr/share/sounds/sf2/FluidR3_GM.sf2 ] || missing+=(fluid-soundfont-gm)
[ ${#missing[@]} -eq 0 ] && exit 0
packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: $packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $packages >/dev/null
  # The prometheus package starts a system server on :9090; the tests run their own.
  if command -v systemctl >/dev/null 2>&1; then systemctl stop prometheus >/dev/null 2>&1 || true; fi
  pkill -x prometheus >/dev/null 2>&1 || true
else
  echo "note: missing Debian packages ($packages); the tests that need them will be skipped." >&2
fi
