#!/usr/bin/env bash
# Download the wheels the GPU suite carries (benchmarks/gpu/wheels.txt) into .whl/ at the repository root,
# for CPython 3.12 on manylinux x86_64, without their dependencies (the list is the whole closure needed there).
# Stale wheels are removed first: two versions of one package stop the install on the device.
#
#   bash benchmarks/gpu/fetch_wheels.sh          # then: benchmarks/gpu/run.sh (see README, "GPU")
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-python3}"
DEST="$ROOT/.whl"
mapfile -t PINS < <(sed -e 's/#.*//' "$ROOT/benchmarks/gpu/wheels.txt" | awk 'NF {print $1}')
rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DEST" "${PINS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
count=$(find "$DEST" -type f -name '*.whl' | wc -l)
if [ "$count" -ne "${#PINS[@]}" ]; then
    echo "fetch_wheels: expected ${#PINS[@]} wheels, got $count in $DEST" >&2
    exit 1
fi
# What travels to the device: tracked + untracked-not-ignored files, plus the carried .whl/ (64 MiB in all).
tree=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
    | awk '{s += $1} END {print s + 0}')
wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
awk -v t="$tree" -v w="$wheels" 'BEGIN {
    total = t + w; limit = 64 * 2^20
    printf "fetch_wheels: %d wheels, %.1f MiB; working tree %.1f MiB; together %.1f MiB of the 64 MiB a call carries\n",
        '"$count"', w / 2^20, t / 2^20, total / 2^20
    exit (total > limit)
}' || { echo "fetch_wheels: over the 64 MiB a device call carries" >&2; exit 1; }
