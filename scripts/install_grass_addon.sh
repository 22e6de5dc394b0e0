#!/usr/bin/env bash
# Install every GRASS module under grass/ (grass/<module>/<module>.py: i.fusion.temporal, t.rast.to.groups)
# on GRASS's addon path, so that
#   grass <project>/<mapset> --exec i.fusion.temporal ...
# runs it. The installed copy's shebang is the absolute path of the virtualenv's Python, where stfuse and
# torch live (GRASS itself starts scripts by their shebang).
#
# Usage: scripts/install_grass_addon.sh [--python PATH] [--prefix DIR]
#   --python PATH  interpreter of the installed script (default: <repo>/.venv/bin/python; env PYTHON_BIN)
#   --prefix DIR   addon base (default: $GRASS_ADDON_BASE, else ~/.grass<major>/addons as the grass
#                  launcher sets it on Linux: ~/.grass8/addons for GRASS 8)
# Writes DIR/scripts/<module> (mode 755) and DIR/docs/html/<module>.html per module; nothing else.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON_BIN:-$root/.venv/bin/python}
base=${GRASS_ADDON_BASE:-}

say() { printf '[install_grass_addon] %s\n' "$*"; }
die() { say "error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --python) [ $# -ge 2 ] || die "--python needs a path"; python=$2; shift 2 ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; base=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

modules=()
for dir in "$root"/grass/*/; do
  name=$(basename "$dir")
  [ -f "$dir/$name.py" ] && modules+=("$name")
done
[ ${#modules[@]} -gt 0 ] || die "no module found under $root/grass (grass/<module>/<module>.py)"
for module in "${modules[@]}"; do
  [ -f "$root/grass/$module/$module.html" ] || die "$root/grass/$module/$module.html (manual page) not found"
done
case "$python" in /*) ;; *) python="$(pwd)/$python" ;; esac  # a shebang needs an absolute path
[ -x "$python" ] || die "Python interpreter $python not found or not executable (run scripts/setup.sh, or give --python)"
"$python" -c 'import stfuse.fusion, stfuse.groups_module' 2>/dev/null \
  || die "$python cannot import stfuse.fusion and stfuse.groups_module (run scripts/setup.sh, or give the venv's python with --python)"
if [ -z "$base" ]; then
  command -v grass >/dev/null 2>&1 || die "grass not on PATH and neither --prefix nor GRASS_ADDON_BASE given"
  major=$(grass --config version | cut -d. -f1)
  base="$HOME/.grass$major/addons"
fi

mkdir -p "$base/scripts" "$base/docs/html"
install_module() {  # $1: module name
  local module=$1 src="$root/grass/$1"
  tmp=$(mktemp "$base/scripts/.$module.XXXXXX")
  trap 'rm -f "$tmp"' EXIT
  { printf '#!%s\n' "$python"; tail -n +2 "$src/$module.py"; } > "$tmp"
  chmod 755 "$tmp"
  mv -f "$tmp" "$base/scripts/$module"  # a rename: a running GRASS never sees a half-written script
  trap - EXIT
  cp "$src/$module.html" "$base/docs/html/$module.html"
  say "installed $base/scripts/$module (python $python) and its manual page"
}
for module in "${modules[@]}"; do install_module "$module"; done
[ "${GRASS_ADDON_BASE:-$base}" = "$base" ] || say "note: GRASS_ADDON_BASE is $GRASS_ADDON_BASE; export GRASS_ADDON_BASE=$base to use it"
