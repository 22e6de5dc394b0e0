#!/usr/bin/env bash
# One-shot set-up: GRASS GIS (system package), a virtualenv with the pinned lock, stfuse editable.
# Idempotent: a stamp keyed on the lock and pyproject makes a rerun with nothing changed take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

say() { printf '[setup] %s\n' "$*"; }

if ! command -v grass >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "GRASS GIS missing: installing grass-core from the system packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq grass-core >/dev/null
  else
    say "GRASS GIS (>= 8.2) is required but 'grass' is not on PATH."
    say "Install it with your package manager, e.g. 'sudo apt-get install grass-core' (Debian/Ubuntu),"
    say "'conda install -c conda-forge grass', or see https://grass.osgeo.org/download/, then rerun."
    exit 1
  fi
fi
grass_version=$(grass --config version 2>/dev/null || true)
case "$grass_version" in
  8.*) ;;
  *) say "GRASS GIS >= 8.2 required, found '${grass_version:-unknown}'"; exit 1 ;;
esac

stamp="$VENV/.stfuse-setup-stamp"
want=$( (cat requirements.txt pyproject.toml; echo "$grass_version") | sha256sum | cut -d' ' -f1)
# The GRASS module i.fusion.temporal on GRASS's addon path (~/.grass8/addons), run by the venv's Python:
# cheap, so on every run (a deleted addon comes back even when nothing else changed).
install_addon() { scripts/install_grass_addon.sh --python "$PWD/$VENV/bin/python" >/dev/null; }

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  install_addon
  say "up to date (GRASS $grass_version, $VENV, GRASS modules on the addon path)"
  exit 0
fi

[ -x "$VENV/bin/python" ] || { say "creating virtualenv $VENV"; "$PYTHON" -m venv "$VENV"; }
say "installing pinned Python dependencies (first run downloads torch, a few minutes)"
"$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e .
# GRASS's Python package lives outside site-packages; a .pth makes `import grass.script` work in the venv.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
grass --config python_path > "$site/grass_gis.pth"
"$VENV/bin/python" -c 'import grass.script, stfuse, torch, snakemake' \
  || { say "import check failed"; exit 1; }
install_addon
echo "$want" > "$stamp"
say "done (GRASS $grass_version, torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
