# Sourced by tools/gpu_runs.sh and tools/gpu_fronts.sh: the device machine's missing wheels, and
# `step`, which runs one timed, logged command of a stage.

install_wheels() {  # install_wheels DIR 'import ...': installs DIR/*.whl when the imports fail
  local dir=$1 imports=$2
  if ls "$dir"/*.whl > /dev/null 2>&1 && ! python -c "$imports" 2> /dev/null; then
    python -m pip install --quiet --no-deps --target /tmp/jaxserve-extra "$dir"/*.whl
    export PYTHONPATH=/tmp/jaxserve-extra${PYTHONPATH:+:$PYTHONPATH}
  fi
}

STEP_TAIL=${STEP_TAIL:-25}
step() {  # step NAME SECONDS CMD...: runs CMD under a time limit, logs to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s"
  tail -n "$STEP_TAIL" "$OUT/$name.log"
}
