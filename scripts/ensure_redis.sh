#!/usr/bin/env bash
# Make sure a Redis answers at IMGSIM_REDIS_URL's host:port (default 127.0.0.1:6379); start one if not.
set -euo pipefail
url=${IMGSIM_REDIS_URL:-redis://127.0.0.1:6379/0}
hostport=${url#redis://}; hostport=${hostport#*@}; hostport=${hostport%%/*}
host=${hostport%%:*}; port=${hostport##*:}; [ "$port" = "$host" ] && port=6379
ping() { redis-cli -h "$host" -p "$port" ping 2>/dev/null | grep -q PONG; }
if command -v redis-cli >/dev/null && ping; then exit 0; fi
if ! command -v redis-server >/dev/null; then
  echo "[redis] installing redis-server (Debian package)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
case "$host" in 127.*|localhost) ;; *) echo "[redis] $host:$port does not answer and is not local" >&2; exit 1;; esac
echo "[redis] starting redis-server on $host:$port"
mkdir -p var/redis
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --dir "$PWD/var/redis" \
  --logfile "$PWD/var/redis/redis.log" --save "" --appendonly no
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "[redis] did not come up; see var/redis/redis.log" >&2; exit 1
