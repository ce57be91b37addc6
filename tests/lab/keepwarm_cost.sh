#!/bin/bash
# Benchmark (not a test): CPU of both grebe gateways of `two-sites`, idle and under
# `ping -i 0.01`, with keep-warm on and off (bridge/io/warm.py). Root; lab instance "kw".
#   sudo tests/lab/keepwarm_cost.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
lab() { .venv/bin/python -m bridge.lab "$@"; }
trap 'lab down --instance kw >/dev/null 2>&1 || true' EXIT
ticks() {  # user+system clock ticks of every process in both gateway namespaces
  local t=0 p
  for p in $(ip netns pids gb-kw-gw-a; ip netns pids gb-kw-gw-b); do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$t"
}
hz=$(getconf CLK_TCK)
for warm in 1 0; do
  lab down --instance kw >/dev/null 2>&1 || true
  GREBE_KEEP_WARM=$warm lab up two-sites --instance kw >/dev/null
  for _ in $(seq 50); do  # until the tunnel carries a ping
    ip netns exec gb-kw-client ping -c 1 -W 1 -q 198.18.2.10 >/dev/null 2>&1 && break
    sleep 0.1
  done
  sleep 2  # past keep-warm's one second after traffic: the idle figure
  a=$(ticks); sleep 5; b=$(ticks)
  idle=$(( (b - a) * 100 / (5 * hz) ))
  ip netns exec gb-kw-client ping -c 500 -i 0.01 -q 198.18.2.10 > /tmp/kw-ping.txt &
  sleep 0.3; a=$(ticks); sleep 4; b=$(ticks); wait
  busy=$(( (b - a) * 100 / (4 * hz) ))
  echo "keep_warm=$warm  idle: ${idle}% of a core  ping -i 0.01: ${busy}% of a core" \
       " $(tail -1 /tmp/kw-ping.txt)"
done
