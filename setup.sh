#!/usr/bin/env bash
# castnode set-up: installs what is missing on a Debian/Ubuntu machine, then
#   ./setup.sh standalone   builds and starts `castnode standalone` (extra flags are passed on)
#   ./setup.sh test         runs the whole test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"

mode="${1:-}"
[ $# -gt 0 ] && shift
case "$mode" in
  standalone|test) ;;
  *) echo "usage: ./setup.sh standalone [castnode flags…] | ./setup.sh test" >&2; exit 64 ;;
esac

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# System packages: a C toolchain and pkg-config for crates that build C, curl for rustup,
# FFmpeg's development libraries;
# for tests, the ffmpeg CLI (fixtures, and the part of OBS and of players) and Chromium (WHEP).
need=()
have() { dpkg -s "$1" >/dev/null 2>&1; }
command -v cc >/dev/null || need+=(build-essential)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v curl >/dev/null || need+=(curl ca-certificates)
# FFmpeg's libraries (castnode transcodes in process; bindgen needs clang to read their headers).
for p in clang libavcodec-dev libavformat-dev libavutil-dev libswresample-dev libswscale-dev \
         libavfilter-dev libavdevice-dev; do
  have "$p" || need+=("$p")
done
if [ "$mode" = test ]; then
  command -v ffmpeg >/dev/null || need+=(ffmpeg)
  command -v python3 >/dev/null || need+=(python3)
  python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)   # schemathesis, from PyPI
  command -v chromium >/dev/null || need+=(chromium)   # headless WebRTC viewer in tests
  command -v openssl >/dev/null || need+=(openssl)     # operator certificates in a cluster test
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  as_root apt-get update -qq
  # --no-install-recommends: some recommended video-driver packages are not always downloadable.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# Rust: the distribution's rustc is too old for edition 2024; rustup brings the stable toolchain.
if ! command -v cargo >/dev/null; then
  [ -x "$HOME/.cargo/bin/cargo" ] || curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
  export PATH="$HOME/.cargo/bin:$PATH"
fi

if [ "$mode" = standalone ]; then
  if [ -x target/release/castnode ]; then
    echo "==> cargo build --release: bringing target/release/castnode up to date"
  else
    echo "==> cargo build --release: building castnode (optimized, a few hundred crates)."
    echo "    The first build takes minutes: about 11 on a busy 2-core machine; later ones seconds."
  fi
  cargo build --release --locked --bin castnode
  echo "==> starting target/release/castnode standalone $*"
  exec ./target/release/castnode standalone "$@"
fi

# The whole test suite.
if [ ! -x target/pyenv/bin/schemathesis ]; then
  echo "==> schemathesis (PyPI) into target/pyenv"
  python3 -m venv target/pyenv
  target/pyenv/bin/pip install -q --disable-pip-version-check schemathesis==4.32.5
fi
echo "==> fixtures"
bash fixtures/make.sh
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "==> cargo test"
cargo test --locked -- --test-threads 1
