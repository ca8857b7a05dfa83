#!/bin/sh
# Make sure the PostgreSQL and Redis servers the tests use answer on loopback; start them if not;
# install the haproxy binary the scale-out tests use where apt can.
# Never stops or flushes anything: tests use their own database and key prefix.
set -u
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! redis_up; then
  echo "ensure-services: starting redis-server on 127.0.0.1:6379" >&2
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
fi
if ! pg_up; then
  echo "ensure-services: starting PostgreSQL" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
fi
# HAProxy for the scale-out tests (tests/scaleout): only the binary, no service is started.
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-services: installing haproxy (Debian package)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy >/dev/null 2>&1 \
      || echo "ensure-services: could not install haproxy; the scale-out tests will skip" >&2
  else
    echo "ensure-services: haproxy is not installed; the scale-out tests will skip" >&2
  fi
fi
i=0
while [ $i -lt 30 ]; do
  if redis_up && pg_up; then exit 0; fi
  i=$((i + 1)); sleep 1
done
redis_up || echo "ensure-services: Redis is not reachable on 127.0.0.1:6379" >&2
pg_up || echo "ensure-services: PostgreSQL is not reachable on 127.0.0.1:5432" >&2
exit 1
