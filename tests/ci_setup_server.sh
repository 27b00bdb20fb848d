#!/bin/sh
# System packages for the `mlxkt serve` tests: headless Chromium and its matching driver,
# for tests/test_serve_page.py (which skips cleanly when they are absent).
# Debian/Ubuntu; run as root (or through sudo) once per CI machine.
set -eu
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
