#!/usr/bin/env bash
# Debian packages the local backends need, and PostgreSQL for the storage tests (its server binaries live in
# /usr/lib/postgresql/<version>/bin, off PATH). As root: installed with apt-get. Otherwise: says exactly what is missing.
set -euo pipefail
declare -A need=([ffmpeg]=ffmpeg [espeak-ng]=espeak-ng [tesseract]=tesseract-ocr)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
# tesseract needs its English data as well as the binary.
if command -v tesseract >/dev/null 2>&1 && ! tesseract --list-langs 2>/dev/null | grep -qx eng; then
  missing+=(tesseract-ocr-eng)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "Missing system packages: ${missing[*]}" >&2
  echo "Install them with:  sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
