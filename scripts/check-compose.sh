#!/usr/bin/env bash
# Checks compose.yaml against the Compose specification's JSON schema
# (there is no Docker engine to run it here). check-jsonschema comes from
# PyPI into a cached virtual environment and ships the schema.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.39.0
VENV=${XDG_CACHE_HOME:-$HOME/.cache}/zapflow/check-jsonschema-$VERSION
if [ ! -x "$VENV/bin/check-jsonschema" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "check-jsonschema==$VERSION"
fi
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec compose.yaml
