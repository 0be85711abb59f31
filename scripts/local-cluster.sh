#!/usr/bin/env bash
# The docker-compose topology from local processes, for machines without a
# container engine: three chatd nodes sharing one SQLite file (WAL) and a
# RabbitMQ, behind nginx with WebSocket upgrade.
#
#   scripts/local-cluster.sh start    # then open http://127.0.0.1:$LB_PORT/
#   scripts/local-cluster.sh status
#   scripts/local-cluster.sh stop     # also removes its exchanges and queues from RabbitMQ
#
# Settings (environment):
#   CLUSTER_DIR        state, logs, store, nginx config  (./data/local-cluster)
#   CHATD_BIN          the chatd binary (default: target/debug/chatd, built if missing)
#   LB_PORT            nginx port                         (8080)
#   NODE_PORTS         chatd ports, one node per port     ("8081 8082 8083")
#   AMQP_URI           RabbitMQ                           (amqp://guest:guest@127.0.0.1:5672/%2f)
#   BROKER_PREFIX      exchange/queue name prefix         (chatd-local)
#   HEARTBEAT_SECS     node heartbeat                     (5)
#   NODE_TIMEOUT_SECS  a silent node counts as gone after (20)
#   JWT_SECRET         shared token secret                (generated into CLUSTER_DIR)
#
# RabbitMQ must be running (`rabbitmq-server -detached` starts it when it is
# installed); nginx comes from Debian (`apt-get install -y nginx-light`).
# The file $CLUSTER_DIR/nodes lists "node_id port pid" per node.
set -euo pipefail

cmd=${1:-start}
root=$(cd "$(dirname "$0")/.." && pwd)
CLUSTER_DIR=${CLUSTER_DIR:-$root/data/local-cluster}
LB_PORT=${LB_PORT:-8080}
NODE_PORTS=${NODE_PORTS:-"8081 8082 8083"}
AMQP_URI=${AMQP_URI:-amqp://guest:guest@127.0.0.1:5672/%2f}
BROKER_PREFIX=${BROKER_PREFIX:-chatd-local}
HEARTBEAT_SECS=${HEARTBEAT_SECS:-5}
NODE_TIMEOUT_SECS=${NODE_TIMEOUT_SECS:-20}

log() { echo "local-cluster: $*" >&2; }

wait_http() { # url seconds
    local url=$1 tries=$(($2 * 10))
    for ((i = 0; i < tries; i++)); do
        if curl -fs -o /dev/null --max-time 1 "$url"; then return 0; fi
        sleep 0.1
    done
    log "$url did not answer 200"
    return 1
}

broker_up() {
    local hostport=${AMQP_URI#*://}
    hostport=${hostport%%/*}
    hostport=${hostport##*@}
    local host=${hostport%%:*} port=5672
    [[ $hostport == *:* ]] && port=${hostport##*:}
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

start() {
    mkdir -p "$CLUSTER_DIR/tmp"
    if [[ -s $CLUSTER_DIR/nodes ]]; then
        log "already started (run stop first): $CLUSTER_DIR/nodes"
        exit 1
    fi
    if ! broker_up; then
        if command -v rabbitmq-server >/dev/null; then
            log "starting RabbitMQ"
            rabbitmq-server -detached
            for _ in $(seq 1 100); do broker_up && break; sleep 0.3; done
        fi
        broker_up || { log "RabbitMQ is not reachable at $AMQP_URI"; exit 1; }
    fi
    command -v nginx >/dev/null || { log "nginx missing: apt-get install -y nginx-light"; exit 1; }
    local bin=${CHATD_BIN:-$root/target/debug/chatd}
    if [[ ! -x $bin ]]; then
        log "building chatd"
        (cd "$root" && cargo build --bin chatd)
        bin=${CARGO_TARGET_DIR:-$root/target}/debug/chatd
    fi
    local secret=${JWT_SECRET:-}
    if [[ -z $secret ]]; then
        [[ -s $CLUSTER_DIR/jwt_secret ]] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$CLUSTER_DIR/jwt_secret"
        secret=$(cat "$CLUSTER_DIR/jwt_secret")
    fi

    : >"$CLUSTER_DIR/nodes"
    local n=0 servers=""
    for port in $NODE_PORTS; do
        n=$((n + 1))
        local id="node$n" role=chat
        # One node runs the notification pool (one e-mail digest per user).
        [[ $n == 1 ]] && role=all
        CHAT__NODE__ID=$id \
        CHAT__NODE__ROLE=$role \
        CHAT__HTTP__LISTEN=127.0.0.1:$port \
        CHAT__STORE__KIND=sqlite \
        CHAT__STORE__SQLITE__PATH=$CLUSTER_DIR/chatd.db \
        CHAT__BROKER__KIND=rabbitmq \
        CHAT__BROKER__RABBITMQ__URI=$AMQP_URI \
        CHAT__BROKER__RABBITMQ__PREFIX=$BROKER_PREFIX \
        CHAT__CLUSTER__HEARTBEAT_SECS=$HEARTBEAT_SECS \
        CHAT__CLUSTER__NODE_TIMEOUT_SECS=$NODE_TIMEOUT_SECS \
        CHAT__AUTH__JWT_SECRET=$secret \
        RUST_LOG=${RUST_LOG:-info} \
            setsid "$bin" </dev/null >"$CLUSTER_DIR/$id.log" 2>&1 &
        echo "$id $port $!" >>"$CLUSTER_DIR/nodes"
        servers+="        server 127.0.0.1:$port max_fails=1 fail_timeout=5s;"$'\n'
    done
    while read -r id port _; do
        wait_http "http://127.0.0.1:$port/readyz" 60 || { tail -20 "$CLUSTER_DIR/$id.log" >&2; stop; exit 1; }
    done <"$CLUSTER_DIR/nodes"

    cat >"$CLUSTER_DIR/nginx.conf" <<EOF
worker_processes 1;
pid $CLUSTER_DIR/nginx.pid;
error_log $CLUSTER_DIR/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $CLUSTER_DIR/tmp/body;
    proxy_temp_path $CLUSTER_DIR/tmp/proxy;
    fastcgi_temp_path $CLUSTER_DIR/tmp/fastcgi;
    uwsgi_temp_path $CLUSTER_DIR/tmp/uwsgi;
    scgi_temp_path $CLUSTER_DIR/tmp/scgi;
    map \$http_upgrade \$connection_upgrade {
        default upgrade;
        ''      close;
    }
    upstream chatd {
$servers    }
    server {
        listen 127.0.0.1:$LB_PORT;
        location / {
            proxy_pass http://chatd;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_connect_timeout 2s;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            proxy_next_upstream error timeout http_502 http_503;
        }
    }
}
EOF
    setsid nginx -p "$CLUSTER_DIR" -c "$CLUSTER_DIR/nginx.conf" -g 'daemon off;' \
        </dev/null >"$CLUSTER_DIR/nginx.log" 2>&1 &
    echo $! >"$CLUSTER_DIR/nginx.pid.launcher"
    wait_http "http://127.0.0.1:$LB_PORT/readyz" 20 || { cat "$CLUSTER_DIR/nginx-error.log" >&2 || true; stop; exit 1; }
    log "up: http://127.0.0.1:$LB_PORT/ -> $(awk '{print $1 ":" $2}' "$CLUSTER_DIR/nodes" | tr '\n' ' ')"
}

stop_pid() { # pid
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# The vhost of AMQP_URI, URL-decoded ("%2f" is "/").
amqp_vhost() {
    local rest=${AMQP_URI#*://}
    local v=/
    [[ $rest == */* ]] && v=${rest#*/}
    v=${v%%\?*}
    [[ -z $v ]] && v=/
    printf '%b' "${v//%/\\x}"
}

# What the nodes declared (src/broker/rabbitmq.rs): exchanges PREFIX.cluster
# and PREFIX.notify and the durable queue PREFIX.notify; each node's own
# queue PREFIX.node.ID is deleted by the node on a clean stop (and expires
# by itself otherwise). Removed with rabbitmqadmin when the management API
# answers, else with rabbitmqctl (the RabbitMQ node on this machine).
remove_broker_objects() {
    local vhost q=$BROKER_PREFIX.notify x1=$BROKER_PREFIX.cluster x2=$BROKER_PREFIX.notify
    vhost=$(amqp_vhost)
    if command -v rabbitmqadmin >/dev/null && rabbitmqadmin -V "$vhost" list vhosts >/dev/null 2>&1; then
        rabbitmqadmin -V "$vhost" delete queue name="$q" >/dev/null 2>&1 || true
        for x in "$x1" "$x2"; do rabbitmqadmin -V "$vhost" delete exchange name="$x" >/dev/null 2>&1 || true; done
    elif command -v rabbitmqctl >/dev/null; then
        rabbitmqctl -q -p "$vhost" delete_queue "$q" >/dev/null 2>&1 || true
        # rabbitmqctl has no delete_exchange: one eval removes both.
        rabbitmqctl -q eval "[rabbit_exchange:delete(rabbit_misc:r(<<\"$vhost\">>, exchange, X), false, <<\"local-cluster.sh\">>) || X <- [<<\"$x1\">>, <<\"$x2\">>]]." >/dev/null 2>&1 \
            || { log "rabbitmqctl could not remove exchanges $x1 $x2 and queue $q: remove them by hand"; return 0; }
    else
        log "no rabbitmqadmin or rabbitmqctl here: remove exchanges $x1 $x2 and queue $q by hand"
        return 0
    fi
    log "removed exchanges $x1 $x2 and queue $q (vhost $vhost)"
}

stop() {
    if [[ -s $CLUSTER_DIR/nginx.pid.launcher ]]; then
        stop_pid "$(cat "$CLUSTER_DIR/nginx.pid.launcher")"
        rm -f "$CLUSTER_DIR/nginx.pid.launcher"
    fi
    if [[ -s $CLUSTER_DIR/nodes ]]; then
        while read -r _ _ pid; do stop_pid "$pid" & done <"$CLUSTER_DIR/nodes"
        wait
        remove_broker_objects
        : >"$CLUSTER_DIR/nodes"
    fi
    log "stopped"
}

status() {
    [[ -s $CLUSTER_DIR/nodes ]] || { log "not running"; return 1; }
    while read -r id port pid; do
        local state=down
        kill -0 "$pid" 2>/dev/null && state=running
        local ready=no
        curl -fs -o /dev/null --max-time 1 "http://127.0.0.1:$port/readyz" && ready=yes
        echo "$id port=$port pid=$pid $state ready=$ready"
    done <"$CLUSTER_DIR/nodes"
    local lb=no
    curl -fs -o /dev/null --max-time 1 "http://127.0.0.1:$LB_PORT/readyz" && lb=yes
    echo "nginx port=$LB_PORT ready=$lb"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
