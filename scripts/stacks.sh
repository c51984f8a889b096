# The supported stacks, in one place: sourced by setup.sh, test.sh and demo.sh.
# A stack is a scanpy release with the Python it runs on, its pinned requirements
# and its own venv. Every stack's tests run in CI: all of them on the two main stacks;
# on 1.12.4-py3.13 (the same pinned set on CPython 3.13) the lifecycle tests and the
# oracle tests, to show the wheel, the daemon's start and the shim work there too.
STACKS="1.11.5 1.12.4 1.12.4-py3.13"

# The venv of a stack (the first stack keeps the historical `.venv`).
stack_venv() {
  case "$1" in
    1.11.5) echo .venv ;;
    1.12.4) echo .venv-1.12.4 ;;
    1.12.4-py3.13) echo .venv-1.12.4-py3.13 ;;
    *) echo "unknown stack $1 (known: $STACKS)" >&2; return 1 ;;
  esac
}

# The interpreter a stack's venv is made with (pyenv's, where pyenv has it).
stack_python() {
  local want
  case "$1" in
    1.11.5) want=3.11 ;;
    1.12.4) want=3.12 ;;
    1.12.4-py3.13) want=3.13 ;;
    *) return 1 ;;
  esac
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v=$(pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}\.[0-9]+$" | sort -V | tail -n 1)
    if [ -n "$v" ]; then
      echo "$(pyenv root)/versions/$v/bin/python3"
      return 0
    fi
  fi
  command -v "python$want"
}

# The pinned requirements of a stack, then the extras its copy of scanpy's own tests needs,
# then the notebook test's (Jupyter kernel and client).
stack_requirements() {
  local scanpy=${1%-py*}
  echo "requirements-test-scanpy-$scanpy.txt"
  if [ -f "tests/requirements-upstream-tests-$scanpy.txt" ]; then
    echo "tests/requirements-upstream-tests-$scanpy.txt"
  fi
  echo "tests/requirements-notebook.txt"
}

# Whether a stack runs every test stage ("all") or the integration tests only ("integration").
stack_stages() {
  case "$1" in
    1.12.4-py3.13) echo integration ;;
    *) echo all ;;
  esac
}
