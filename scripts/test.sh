#!/usr/bin/env bash
# The project's test command: formatting, lints, unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
