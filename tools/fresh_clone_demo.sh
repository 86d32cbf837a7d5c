#!/usr/bin/env bash
# Times the README's main command (`make demo`) the way a fresh machine runs it:
# a fresh clone, an empty runtime cache, ccache and pip's cache off.
# Usage: tools/fresh_clone_demo.sh [WORKDIR]   (default: a new temp dir)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
git clone -q "$repo" "$work/clone"
cd "$work/clone"
export HIQ2GGUF_CACHE="$work/cache" CCACHE_DISABLE=1 PIP_NO_CACHE_DIR=1
start=$(date +%s)
make demo 2>&1 | tee "$work/demo.log"
end=$(date +%s)
echo "make demo on a fresh clone: $((end - start)) s (log: $work/demo.log, report: $work/clone/out/smollm2-135m-hiq2.json)"
