#!/usr/bin/env bash
# nlvid's two commands:
#   bash run.sh demo   install nlvid into ./.venv (once), then synth data -> train -> eval -> predict -> visualize
#   bash run.sh test   install (once), then run the test suite (what .ci/run calls)
#   bash run.sh lint   install (once), then check the import-layer contract (lint-imports; .ci/run calls it)
# Idempotent: the install is redone only when pyproject.toml changes.
# NLVID_TORCH overrides the torch pin (default: the release these machines carry on disk).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${NLVID_VENV:-.venv}"
TORCH_SPEC="${NLVID_TORCH:-torch==2.14.1 torchvision==0.29.1}"

ensure_env() {
  local py="${PYTHON:-python3}"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[run.sh] creating virtual environment $VENV" >&2
    "$py" -m venv "$VENV"
  fi
  local stamp="$VENV/.nlvid-install-stamp"
  local want
  want="$( (cat pyproject.toml; echo "$TORCH_SPEC") | sha256sum | cut -c1-16)"
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "[run.sh] installing $TORCH_SPEC and nlvid (editable) into $VENV" >&2
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check $TORCH_SPEC 2>&1 | grep -v '^WARNING: Location' >&2 || true
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' >&2 || true
    "$VENV/bin/python" -c 'import nlvid, torch, torchvision, av, typer, rich, yaml' \
      || { echo "[run.sh] install failed" >&2; exit 1; }
    echo "$want" > "$stamp"
  fi
}

run_tests() {
  local rc=0
  "$VENV/bin/python" -m pytest -q "$@" || rc=$?  # pyproject's addopts deselect the slow tests
  if [ "$rc" -eq 5 ]; then echo "[run.sh] no tests were collected: that is a failure" >&2; exit 1; fi
  [ "$rc" -eq 0 ] || exit "$rc"
  if [ "${CI:-}" = "true" ] || [ "${NLVID_SLOW:-0}" = "1" ]; then
    rc=0
    "$VENV/bin/python" -m pytest -q -m slow "$@" || rc=$?
    # exit 5 here only means no test is marked slow
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then exit "$rc"; fi
  fi
}

case "${1:-}" in
  demo) shift; ensure_env; exec "$VENV/bin/python" scripts/demo.py "$@" ;;
  test) shift; ensure_env; run_tests "$@" ;;
  lint) shift; ensure_env; exec "$VENV/bin/lint-imports" "$@" ;;
  *) echo "usage: bash run.sh demo|test|lint [args]" >&2; exit 2 ;;
esac
