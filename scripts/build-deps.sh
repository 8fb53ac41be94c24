#!/usr/bin/env bash
# Build tools the workspace needs besides Rust: cmake and (on x86) nasm build libjpeg-turbo,
# the JPEG decoder of edge-runtime (turbojpeg-sys compiles it from source, with its SIMD code).
# Installs the missing Debian packages when run as root; otherwise names them and fails.
set -euo pipefail

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v cc >/dev/null || missing+=(gcc)
case "$(uname -m)" in x86_64 | i?86) command -v nasm >/dev/null || missing+=(nasm) ;; esac
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${missing[@]}" >&2 \
    || { apt-get update >&2 && apt-get install -y --no-install-recommends "${missing[@]}" >&2; }
else
  echo "error: building needs ${missing[*]}: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
