# The supported stacks, in one place: sourced by setup.sh, test.sh and demo.sh.
# A stack is a scanpy release with the Python it runs on, its pinned requirements
# and its own venv. Every stack's tests run in CI.
STACKS="1.11.5 1.12.4"

# The venv of a stack (the first stack keeps the historical `.venv`).
stack_venv() {
  case "$1" in
    1.11.5) echo .venv ;;
    1.12.4) echo .venv-1.12.4 ;;
    *) echo "unknown stack $1 (known: $STACKS)" >&2; return 1 ;;
  esac
}

# The interpreter a stack's venv is made with (pyenv's, where pyenv has it).
stack_python() {
  local want
  case "$1" in
    1.11.5) want=3.11 ;;
    1.12.4) want=3.12 ;;
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

# The pinned requirements of a stack, then the extras its copy of scanpy's own tests needs.
stack_requirements() {
  echo "requirements-test-scanpy-$1.txt"
  if [ -f "tests/requirements-upstream-tests-$1.txt" ]; then
    echo "tests/requirements-upstream-tests-$1.txt"
  fi
}
