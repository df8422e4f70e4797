#!/usr/bin/env bash
# Unit tests of the modules that never call ggml (error, units, gguf) under Miri, which
# checks every unsafe-adjacent operation for undefined behaviour. Needs a nightly toolchain
# with the miri component; where that cannot be had, says so and succeeds.
set -uo pipefail
cd "$(dirname "$0")/miri"
if ! cargo +nightly miri --version >/dev/null 2>&1; then
    rustup +nightly component add miri rust-src >/dev/null 2>&1 || true
fi
if ! cargo +nightly miri --version >/dev/null 2>&1; then
    echo "miri: not available on this machine (needs nightly + the miri component); skipped"
    exit 0
fi
# The seed-corpus check reads files relative to the main crate; it has no unsafe to check.
MIRIFLAGS="-Zmiri-disable-isolation" cargo +nightly miri test -- --skip fuzz_seeds_are_current
