#!/usr/bin/env bash
# Times N signals (disable, then enable, one agent) sent with `agentca admin` to SERVER, one
# after the other, and prints the median and the 90th and 99th percentiles of the answer time
# (the CLI's own start included). Run it against a lone server and against a fleet replica
# (deploy/fleet-local.sh) to see what the fleet adds.
#
#   deploy/ack-latency.sh 127.0.0.1:50051 [N]
set -euo pipefail
server=${1:?usage: $0 HOST:PORT [N]}
n=${2:-200}
agentca=${AGENTCA:-target/release/agentca}
times=()
for ((i = 0; i < n; i++)); do
  kind=$([ $((i % 2)) -eq 0 ] && echo disable-agent || echo enable-agent)
  start=$(date +%s%N)
  "$agentca" admin --server "$server" "$kind" ag-mail-01 --reason latency >/dev/null
  times+=($(($(date +%s%N) - start)))
done
printf '%s\n' "${times[@]}" | sort -n | awk -v n="$n" '
  { t[NR] = $1 }
  END { printf "%d signals: p50 %.2f ms, p90 %.2f ms, p99 %.2f ms\n", n, t[int(n*0.5)]/1e6, t[int(n*0.9)]/1e6, t[int(n*0.99)]/1e6 }'
