#!/usr/bin/env bash
# Rebuilds vendor/dimpl: dimpl 0.9.0 from crates.io (checksum as in the crate registry), without
# its tests and agent notes, plus vendor/dimpl.patch. See vendor/README.md for why.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VERSION=0.9.0
SHA256=b2c7b707106416bb46237cf25b702975015079fc5fa8791232b639bc4619c2de
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -sSfL "https://static.crates.io/crates/dimpl/dimpl-$VERSION.crate" -o "$tmp/dimpl.crate"
echo "$SHA256  $tmp/dimpl.crate" | sha256sum -c --quiet
tar -xzf "$tmp/dimpl.crate" -C "$tmp"
src="$tmp/dimpl-$VERSION"
rm -rf "$src/tests" "$src/AGENTS.md" "$src/CLAUDE.md" "$src/Cargo.lock" "$src/Cargo.toml.orig" \
    "$src/cargo_deny.sh" "$src/deny.toml" "$src/.cargo_vcs_info.json" "$src/.cargo" \
    "$src/.github" "$src/.vscode" "$src/.taplo.toml" "$src/.gitignore" "$src/.cargo-ok"
# The integration tests are not shipped here, so their [[test]] tables go too.
awk '/^\[\[test\]\]$/ {skip = 1; next} /^\[/ {skip = 0} !skip' "$src/Cargo.toml" >"$src/Cargo.toml.new"
mv "$src/Cargo.toml.new" "$src/Cargo.toml"
patch -s -d "$src" -p1 <dimpl.patch
rm -rf dimpl
mv "$src" dimpl
echo "vendor/dimpl: dimpl $VERSION + dimpl.patch"
