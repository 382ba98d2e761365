#!/usr/bin/env bash
# Run ollama-guard natively on an Apple Silicon Mac, scanning on the MPS GPU.
# (Containers on macOS cannot reach MPS: this native runner is the way to use it.)
#
#   ./run_proxy_macos.sh detect        show the platform, MPS availability and the device that will be used
#   ./run_proxy_macos.sh run           run the proxy in the foreground
#   ./run_proxy_macos.sh start         start it in the background and wait until /health answers
#   ./run_proxy_macos.sh stop          stop the background proxy
#   ./run_proxy_macos.sh status        exit 0 when running (prints /health), 3 when not
#   ./run_proxy_macos.sh install       install and start a launchd agent (starts at login, restarted on exit)
#   ./run_proxy_macos.sh uninstall     stop and remove the launchd agent
#   ./run_proxy_macos.sh plist         print the launchd plist that install writes
#   ./run_proxy_macos.sh register ARGS register this Mac as a ScanNode: ollama-guard node register ARGS
#
# Settings (environment): PROXY_HOST (default 127.0.0.1; 0.0.0.0 for a ScanNode the cluster reaches),
# PROXY_PORT (8080), OLLAMA_URL (http://127.0.0.1:11434), OLLAMA_GUARD_CONFIG (config file),
# MPS_ENABLE_FP16 (1), LLM_GUARD_DEVICE (detected: mps when available, else cpu),
# OLLAMA_GUARD_BIN (ollama-guard executable; default .venv/bin/ollama-guard next to this script, then PATH),
# OLLAMA_GUARD_PYTHON (python used to probe MPS), OLLAMA_GUARD_STATE_DIR (pid file and logs),
# OLLAMA_GUARD_START_TIMEOUT (seconds start waits for /health, default 300: loading models takes a while).
set -euo pipefail

readonly LABEL="io.ollama-guard.proxy"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
SCRIPT_PATH="${SCRIPT_DIR}/$(basename "${BASH_SOURCE[0]}")"
readonly SCRIPT_PATH

PROXY_HOST="${PROXY_HOST:-127.0.0.1}"
PROXY_PORT="${PROXY_PORT:-8080}"
OLLAMA_URL="${OLLAMA_URL:-http://127.0.0.1:11434}"
START_TIMEOUT="${OLLAMA_GUARD_START_TIMEOUT:-300}"

if [[ "$(uname -s)" == "Darwin" ]]; then
  STATE_DIR="${OLLAMA_GUARD_STATE_DIR:-${HOME}/Library/Application Support/ollama-guard}"
  LOG_DIR="${OLLAMA_GUARD_LOG_DIR:-${HOME}/Library/Logs/ollama-guard}"
else
  STATE_DIR="${OLLAMA_GUARD_STATE_DIR:-${XDG_STATE_HOME:-${HOME}/.local/state}/ollama-guard}"
  LOG_DIR="${OLLAMA_GUARD_LOG_DIR:-${STATE_DIR}/logs}"
fi
PID_FILE="${STATE_DIR}/proxy.pid"
LOG_FILE="${LOG_DIR}/proxy.log"
PLIST="${HOME}/Library/LaunchAgents/${LABEL}.plist"

die() { echo "run_proxy_macos.sh: $*" >&2; exit 2; }
info() { echo "run_proxy_macos.sh: $*" >&2; }

is_darwin() { [[ "$(uname -s)" == "Darwin" ]]; }

# Apple Silicon, also when this shell runs under Rosetta (uname -m says x86_64 there).
is_apple_silicon() {
  is_darwin || return 1
  [[ "$(uname -m)" == "arm64" ]] && return 0
  [[ "$(sysctl -n hw.optional.arm64 2>/dev/null || echo 0)" == "1" ]]
}

ollama_guard_bin() {
  if [[ -n "${OLLAMA_GUARD_BIN:-}" ]]; then
    echo "${OLLAMA_GUARD_BIN}"
  elif [[ -x "${SCRIPT_DIR}/.venv/bin/ollama-guard" ]]; then
    echo "${SCRIPT_DIR}/.venv/bin/ollama-guard"
  elif command -v ollama-guard >/dev/null 2>&1; then
    command -v ollama-guard
  else
    die "ollama-guard not found: run 'make install-proxy' (or pip install the proxy) or set OLLAMA_GUARD_BIN"
  fi
}

python_bin() {
  if [[ -n "${OLLAMA_GUARD_PYTHON:-}" ]]; then
    echo "${OLLAMA_GUARD_PYTHON}"
  elif [[ -x "${SCRIPT_DIR}/.venv/bin/python" ]]; then
    echo "${SCRIPT_DIR}/.venv/bin/python"
  else
    command -v python3 || echo python3
  fi
}

mps_available() {
  is_apple_silicon || return 1
  "$(python_bin)" -c 'import sys, torch; sys.exit(0 if torch.backends.mps.is_available() else 1)' 2>/dev/null
}

# The environment the proxy runs with; LLM_GUARD_DEVICE set by the user wins.
proxy_env() {
  export PROXY_HOST PROXY_PORT OLLAMA_URL
  export PYTORCH_ENABLE_MPS_FALLBACK=1  # ops MPS lacks run on the CPU instead of failing
  export MPS_ENABLE_FP16="${MPS_ENABLE_FP16:-1}"
  if [[ -z "${LLM_GUARD_DEVICE:-}" ]]; then
    if mps_available; then LLM_GUARD_DEVICE=mps; else LLM_GUARD_DEVICE=cpu; fi
  fi
  export LLM_GUARD_DEVICE
}

health_url() {
  local host="${PROXY_HOST}"
  [[ "${host}" == "0.0.0.0" || "${host}" == "::" ]] && host="127.0.0.1"
  echo "http://${host}:${PROXY_PORT}/health"
}

healthy() { curl -fsS --max-time 3 "$(health_url)" 2>/dev/null; }

running_pid() {
  [[ -f "${PID_FILE}" ]] || return 1
  local pid
  pid="$(cat "${PID_FILE}")"
  [[ "${pid}" =~ ^[0-9]+$ ]] && kill -0 "${pid}" 2>/dev/null && { echo "${pid}"; return 0; }
  return 1
}

cmd_detect() {
  echo "os: $(uname -s) $(uname -m)"
  if is_apple_silicon; then echo "apple_silicon: yes"; else echo "apple_silicon: no"; fi
  if mps_available; then echo "mps: available"; else echo "mps: unavailable"; fi
  proxy_env
  echo "device: ${LLM_GUARD_DEVICE}"
  echo "PYTORCH_ENABLE_MPS_FALLBACK=${PYTORCH_ENABLE_MPS_FALLBACK} MPS_ENABLE_FP16=${MPS_ENABLE_FP16}"
}

cmd_run() {
  is_darwin || info "not macOS: running with LLM_GUARD_DEVICE=${LLM_GUARD_DEVICE:-cpu} (no MPS here)"
  proxy_env
  local bin
  bin="$(ollama_guard_bin)"
  info "device ${LLM_GUARD_DEVICE}, listening on ${PROXY_HOST}:${PROXY_PORT}, guarding ${OLLAMA_URL}"
  exec "${bin}" serve "$@"
}

cmd_start() {
  local pid
  if pid="$(running_pid)"; then
    echo "already running (pid ${pid})"
    return 0
  fi
  proxy_env
  local bin
  bin="$(ollama_guard_bin)"
  mkdir -p "${STATE_DIR}" "${LOG_DIR}"
  nohup "${bin}" serve "$@" >>"${LOG_FILE}" 2>&1 &
  pid=$!
  echo "${pid}" >"${PID_FILE}"
  local deadline=$((SECONDS + START_TIMEOUT))
  until healthy >/dev/null; do
    if ! kill -0 "${pid}" 2>/dev/null; then
      rm -f "${PID_FILE}"
      tail -n 20 "${LOG_FILE}" >&2 || true
      die "the proxy exited during start-up (log: ${LOG_FILE})"
    fi
    if ((SECONDS >= deadline)); then
      die "no answer on $(health_url) after ${START_TIMEOUT}s (pid ${pid} still running; log: ${LOG_FILE})"
    fi
    sleep 0.5
  done
  echo "started (pid ${pid}, device ${LLM_GUARD_DEVICE}): $(health_url)"
}

cmd_stop() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "${PID_FILE}"
    echo "not running"
    return 0
  fi
  kill -TERM "${pid}"
  local deadline=$((SECONDS + 30))
  while kill -0 "${pid}" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      info "pid ${pid} ignored SIGTERM for 30s; sending SIGKILL"
      kill -KILL "${pid}" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  rm -f "${PID_FILE}"
  echo "stopped (pid ${pid})"
}

cmd_status() {
  local pid body
  if pid="$(running_pid)"; then
    if body="$(healthy)"; then
      echo "running (pid ${pid}): ${body}"
    else
      echo "running (pid ${pid}), not answering on $(health_url) yet"
    fi
    return 0
  fi
  if is_darwin && launchctl print "gui/$(id -u)/${LABEL}" >/dev/null 2>&1; then
    if body="$(healthy)"; then
      echo "running (launchd ${LABEL}): ${body}"
      return 0
    fi
    echo "launchd agent ${LABEL} loaded, not answering on $(health_url)"
    return 3
  fi
  echo "not running"
  return 3
}

# sed, not ${s//&/...}: bash 5.2 gives & a meaning there, and macOS ships bash 3.2.
xml_escape() {
  printf '%s' "$1" | sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g'
}

cmd_plist() {
  proxy_env
  local bin
  bin="$(ollama_guard_bin)"
  local env_keys=(PROXY_HOST PROXY_PORT OLLAMA_URL PYTORCH_ENABLE_MPS_FALLBACK MPS_ENABLE_FP16 LLM_GUARD_DEVICE)
  local optional_keys=(OLLAMA_GUARD_CONFIG MODELS_PATH REDIS_URL OLLAMA_GUARD_API_KEYS_FILE
    OLLAMA_GUARD_ADMIN_TOKEN_FILE HF_HOME HF_HUB_OFFLINE TRANSFORMERS_OFFLINE)
  local key
  for key in "${optional_keys[@]}"; do
    [[ -n "${!key:-}" ]] && env_keys+=("${key}")
  done
  cat <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key>
  <string>${LABEL}</string>
  <key>ProgramArguments</key>
  <array>
    <string>$(xml_escape "${bin}")</string>
    <string>serve</string>
  </array>
  <key>EnvironmentVariables</key>
  <dict>
EOF
  for key in "${env_keys[@]}"; do
    printf '    <key>%s</key>\n    <string>%s</string>\n' "${key}" "$(xml_escape "${!key}")"
  done
  cat <<EOF
  </dict>
  <key>WorkingDirectory</key>
  <string>$(xml_escape "${SCRIPT_DIR}")</string>
  <key>RunAtLoad</key>
  <true/>
  <key>KeepAlive</key>
  <dict>
    <key>SuccessfulExit</key>
    <false/>
  </dict>
  <key>ThrottleInterval</key>
  <integer>10</integer>
  <key>StandardOutPath</key>
  <string>$(xml_escape "${LOG_FILE}")</string>
  <key>StandardErrorPath</key>
  <string>$(xml_escape "${LOG_FILE}")</string>
</dict>
</plist>
EOF
}

require_macos() {
  is_darwin || die "'$1' installs a launchd agent and works on macOS only (this is $(uname -s)); use 'run' or 'start' here"
}

cmd_install() {
  require_macos install
  is_apple_silicon || info "not Apple Silicon: no MPS, the proxy will scan on the CPU"
  mkdir -p "$(dirname "${PLIST}")" "${LOG_DIR}"
  if launchctl print "gui/$(id -u)/${LABEL}" >/dev/null 2>&1; then
    launchctl bootout "gui/$(id -u)/${LABEL}" 2>/dev/null || true
  fi
  cmd_plist >"${PLIST}"
  plutil -lint "${PLIST}" >/dev/null
  launchctl bootstrap "gui/$(id -u)" "${PLIST}"
  launchctl enable "gui/$(id -u)/${LABEL}" 2>/dev/null || true
  echo "installed ${PLIST} (launchd ${LABEL}, log ${LOG_FILE})"
}

cmd_uninstall() {
  require_macos uninstall
  launchctl bootout "gui/$(id -u)/${LABEL}" 2>/dev/null || true
  rm -f "${PLIST}"
  echo "uninstalled ${LABEL}"
}

cmd_register() {
  if [[ "${PROXY_HOST}" == "127.0.0.1" || "${PROXY_HOST}" == "localhost" ]]; then
    info "warning: the proxy listens on ${PROXY_HOST}; the cluster reaches a ScanNode only with PROXY_HOST=0.0.0.0"
  fi
  [[ $# -gt 0 ]] || die "register needs the ScanNode arguments, e.g.: register --help"
  exec "$(ollama_guard_bin)" node register "$@"
}

usage() { sed -n '2,22p' "${SCRIPT_PATH}" | sed 's/^# \{0,1\}//'; }

main() {
  local cmd="${1:-help}"
  [[ $# -gt 0 ]] && shift
  case "${cmd}" in
    detect) cmd_detect ;;
    run) cmd_run "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) cmd_stop && cmd_start "$@" ;;
    install) cmd_install ;;
    uninstall) cmd_uninstall ;;
    plist) cmd_plist ;;
    register) cmd_register "$@" ;;
    help | -h | --help) usage ;;
    *) usage >&2; die "unknown command '${cmd}'" ;;
  esac
}

main "$@"
