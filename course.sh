#!/usr/bin/env bash
# The course's two commands (and a doctor). Needs only Python 3.11 on the machine:
#   ./course.sh lab      create .venv if missing, then open the course in JupyterLab
#   ./course.sh test     create .venv if missing, then run every test: unit tests and all notebooks
#   ./course.sh doctor   print OK/FAIL for each dependency and whether a GPU is seen
# Extra arguments after `test` go to pytest (e.g. ./course.sh test tests/test_nn.py -x).
set -euo pipefail
cd "$(dirname "$0")"

VENV="${COURSE_VENV:-.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning made steps 10x slower.
export OMP_WAIT_POLICY=PASSIVE

find_python() {
  for candidate in "${PYTHON:-}" python3.11 python3 python; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "course.sh: Python 3.11 is needed (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

ensure_env() {
  local stamp="$VENV/.course-installed"
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$stamp" -nt requirements.txt ] && [ "$stamp" -nt pyproject.toml ]; then
    return 0
  fi
  local py; py=$(find_python)
  echo "Creating the course environment in $VENV (first run: about 2 minutes, 1.8 GB)..."
  [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
  touch "$stamp"
}

case "${1:-}" in
  lab)
    ensure_env
    shift
    # Containers often run as root, which JupyterLab refuses without this flag.
    if [ "$(id -u)" = 0 ]; then set -- --allow-root "$@"; fi
    # tools/course_lab.py runs JupyterLab with the built notebooks trusted and widget state saved
    # with them, so figures and widgets show on first open and still after a save.
    exec "$VENV/bin/python" tools/course_lab.py --notebook-dir=. notebooks/00_course_tour.ipynb "$@"
    ;;
  test)
    ensure_env
    shift
    "$VENV/bin/python" -m course_lib.doctor
    if [ $# -eq 0 ]; then set -- tests notebooks solutions; fi
    # Two worker processes of one thread each, a notebook per worker at a time (--dist loadfile):
    # 1.8x the throughput of one process with two threads (BENCHMARKS.md). COURSE_TEST_WORKERS=0
    # runs everything in this process instead.
    workers="${COURSE_TEST_WORKERS:-2}"
    parallel=()
    if [ "$workers" -gt 0 ]; then parallel=(-n "$workers" --dist loadfile); export COURSE_THREADS=1; fi
    if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 &&
       ! command -v google-chrome >/dev/null 2>&1; then
      echo "course.sh: no chromium found: the browser test (tests/test_browser.py) will be skipped; install it with \`apt-get install chromium\` (Debian/Ubuntu) to enable it"
    fi
    exec "$VENV/bin/python" -m pytest "$@" "${parallel[@]}" \
      --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
      --nbval-cell-timeout=600 --durations=15 -q
    ;;
  doctor)
    ensure_env
    exec "$VENV/bin/python" -m course_lib.doctor
    ;;
  *)
    sed -n '2,7p' "$0"
    exit 2
    ;;
esac
