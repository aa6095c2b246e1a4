#!/usr/bin/env bash
# A real Slurm cluster on this machine, for tests and CI (Debian 12, root, no systemd needed).
#
# Usage:
#   bash env/local_slurm.sh start  [--nodes N]   start (or keep) the cluster and wait until its nodes are idle
#   bash env/local_slurm.sh stop   [--nodes N]   cancel jobs, stop the daemons this script started
#   bash env/local_slurm.sh status [--nodes N]   daemons + sinfo; exit 0 if up, 3 if not
#   bash env/local_slurm.sh env    [--nodes N]   prints `export SLURM_CONF=...`; use with eval
#   bash env/local_slurm.sh exec   NODE CMD...   run CMD inside a multi-node node (node1..), as its jobs see it
#
# --nodes 1 (default): one node named after this host, on loopback.
#   State ${SLURM_LOCAL_DIR:-/tmp/slurm-local}; slurmctld 6817, slurmd 6818, slurmdbd 6819, mariadb 3307.
#   SLURM_LOCAL_CPUS (8), SLURM_LOCAL_GPUS (4), SLURM_LOCAL_ACCOUNTING (1), SLURM_LOCAL_LINK_ETC (1).
# --nodes N>=2: nodes node1..nodeN, one network namespace each (mn-nodeI, 10.77.0.1I) on bridge mnbr0
#   (10.77.0.1/24 on the host side). State ${SLURM_MN_DIR:-/tmp/slurm-mn}; slurmctld 6917, slurmd 6918,
#   slurmdbd 6919 (at 10.77.0.1), mariadb 3308. SLURM_MN_CPUS (4), SLURM_MN_GPUS (2) per node,
#   SLURM_MN_ACCOUNTING (1).
# Both clusters can run at the same time. Clients pick one with SLURM_CONF (see `env`); for the one-node
# cluster /etc/slurm/slurm.conf is also linked to its config when that path is free.
# GPUs are fake: gres files are symlinks to /dev/null, so jobs get CUDA_VISIBLE_DEVICES but no CUDA device.
# Logs: STATE/log/*.log.

set -Eeuo pipefail

PROG=local_slurm.sh
FAILED_AT=""
DIED=""
trap 'FAILED_AT="line $LINENO: $BASH_COMMAND"' ERR

die() {  # die MESSAGE [LOGFILE]
    DIED=1
    if [ -n "${2:-}" ]; then
        echo "$PROG: $1; see $2" >&2
    else
        echo "$PROG: $1" >&2
    fi
    exit 1
}

on_exit() {
    local rc=$?
    # An unexpected failure under `set -e` would otherwise exit silently.
    if [ "$rc" -ne 0 ] && [ -z "$DIED" ] && [ -n "$FAILED_AT" ]; then
        echo "$PROG: ${VERB:-?} failed at $FAILED_AT; logs in ${S:-?}/log" >&2
    fi
}
trap on_exit EXIT

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    DIED=1
    exit 2
}

# ---------------------------------------------------------------- arguments
VERB="${1:-}"
[ -n "$VERB" ] || usage
shift
NODES=1
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) [ $# -ge 2 ] || usage; NODES="$2"; shift 2 ;;
        --nodes=*) NODES="${1#--nodes=}"; shift ;;
        -h|--help) usage ;;
        *) break ;;
    esac
done
case "$NODES" in ''|*[!0-9]*) die "--nodes wants a number from 1 to 99, got '$NODES'" ;; esac
NODES=$((10#$NODES))
if [ "$NODES" -lt 1 ] || [ "$NODES" -gt 99 ]; then die "--nodes wants a number from 1 to 99, got '$NODES'"; fi
# `exec` only makes sense for the namespace nodes.
[ "$VERB" = exec ] && [ "$NODES" -eq 1 ] && NODES=2

HOST="$(hostname -s)"
if [ "$NODES" -eq 1 ]; then
    MULTI=0
    S="${SLURM_LOCAL_DIR:-/tmp/slurm-local}"
    CLUSTER=localcluster
    CTLD_PORT=6817; SLURMD_PORT=6818; DBD_PORT=6819; DB_PORT=3307
    CTLD_ADDR=127.0.0.1
    CPUS="${SLURM_LOCAL_CPUS:-8}"
    GPUS="${SLURM_LOCAL_GPUS:-4}"
    ACCOUNTING="${SLURM_LOCAL_ACCOUNTING:-1}"
else
    MULTI=1
    S="${SLURM_MN_DIR:-/tmp/slurm-mn}"
    CLUSTER=mncluster
    CTLD_PORT=6917; SLURMD_PORT=6918; DBD_PORT=6919; DB_PORT=3308
    NET="${SLURM_MN_NET:-10.77.0}"
    BRIDGE=mnbr0
    CTLD_ADDR="$NET.1"
    CPUS="${SLURM_MN_CPUS:-4}"
    GPUS="${SLURM_MN_GPUS:-2}"
    ACCOUNTING="${SLURM_MN_ACCOUNTING:-1}"
fi
for v in CPUS GPUS; do
    case "${!v}" in ''|*[!0-9]*) die "the CPU and GPU counts must be whole numbers, got $v='${!v}'" ;; esac
done
[ "$CPUS" -ge 1 ] || die "a node needs at least 1 CPU, got $CPUS"
case "$ACCOUNTING" in 0|1) ;; *) die "accounting must be 0 or 1, got '$ACCOUNTING'" ;; esac
S="${S%/}"
case "$S" in /*) ;; *) die "the state dir must be an absolute path, got '$S'" ;; esac
CONF="$S/etc/slurm.conf"
MUNGE_SOCK="$S/munge/munge.socket.2"
LOG="$S/log"
RUN="$S/run"
# Every daemon gets this in its environment; it also marks it as ours for the pid checks.
export SLURM_CONF="$CONF"

# ---------------------------------------------------------------- helpers
node_names() {
    if [ "$MULTI" -eq 0 ]; then
        echo "$HOST"
    else
        local i
        for ((i = 1; i <= NODES; i++)); do echo "node$i"; done
    fi
}

# pid_of NAME PIDFILE: prints the pid if PIDFILE names a live NAME process started by this cluster.
pid_of() {
    local name="$1" pidfile="$2" pid state
    [ -r "$pidfile" ] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 1
    # A zombie still has /proc/PID/comm.
    state="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$pid/status" 2>/dev/null)"
    [ "$state" != Z ] || return 1
    # A stale pid file could name a recycled pid, e.g. the other cluster's slurmd.
    if [ -r "/proc/$pid/environ" ]; then
        grep -qxF "SLURM_CONF=$CONF" <(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null) || return 1
    fi
    echo "$pid"
}

# Reads /proc instead of connecting, so the daemon logs no bogus connection.
port_listening() {
    local hex
    hex="$(printf ':%04X' "$1")"
    awk -v p="$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# wait_daemon NAME PIDFILE LOGFILE SECONDS WHAT CMD...: polls CMD until it succeeds; dies early if the
# daemon is gone (its pid file may appear a moment after the fork, hence the grace of 3 s).
wait_daemon() {
    local name="$1" pidfile="$2" logfile="$3" limit="$4" what="$5"
    shift 5
    local t0=$SECONDS
    until "$@" >/dev/null 2>&1; do
        if [ $((SECONDS - t0)) -ge 3 ] && ! pid_of "$name" "$pidfile" >/dev/null; then
            die "$name exited during startup" "$logfile"
        fi
        [ $((SECONDS - t0)) -lt "$limit" ] || die "$name $what after $limit s" "$logfile"
        sleep 0.2
    done
}

# A port held by something else (e.g. a stock daemon, or a second state dir with the same ports)
# would make our daemon exit with a bind error; say so plainly instead.
port_free_or_die() {  # port_free_or_die PORT WHAT
    port_listening "$1" || return 0
    die "port $1 (for $2) is already in use by another process; stop it or use the other cluster mode" "$LOG/$2.log"
}

# stop_pids PID...: TERM, wait up to 20 s, then KILL.
stop_pids() {
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    local deadline=$((SECONDS + 20)) p alive
    while :; do
        alive=()
        for p in "$@"; do
            if [ -d "/proc/$p" ] && [ "$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$p/status" 2>/dev/null)" != Z ]; then
                alive+=("$p")
            fi
        done
        [ ${#alive[@]} -gt 0 ] || return 0
        if [ "$SECONDS" -ge "$deadline" ]; then
            kill -KILL "${alive[@]}" 2>/dev/null || true
            return 0
        fi
        sleep 0.2
    done
}

munge_ok() { munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK"; }
ctld_ok() { [[ "$(scontrol ping 2>/dev/null)" == *"is UP"* ]]; }

slurmd_pidfile() {
    if [ "$MULTI" -eq 0 ]; then echo "$RUN/slurmd.pid"; else echo "$RUN/slurmd-$1.pid"; fi
}
slurmd_log() {
    if [ "$MULTI" -eq 0 ]; then echo "$LOG/slurmd.log"; else echo "$LOG/slurmd-$1.log"; fi
}

accounting_configured() { [ -r "$CONF" ] && grep -q '^AccountingStorageType=accounting_storage/slurmdbd' "$CONF"; }

# Node count of the running or last started multi-node cluster.
configured_nodes() { grep -c '^NodeName=' "$CONF" 2>/dev/null || true; }

# ---------------------------------------------------------------- install
PKGS_SLURM=(slurmctld slurmd slurm-client munge)
PKGS_ACCT=(mariadb-server slurmdbd)

pkg_installed() { [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]; }

install_packages() {
    local want=("${PKGS_SLURM[@]}") missing=() p
    [ "$ACCOUNTING" = 1 ] && want+=("${PKGS_ACCT[@]}")
    [ "$MULTI" -eq 1 ] && { command -v ip >/dev/null || want+=(iproute2); }
    for p in "${want[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} -gt 0 ] || return 0
    [ "$(id -u)" -eq 0 ] || die "packages missing (${missing[*]}) and not root to install them"
    echo "installing Debian packages: ${missing[*]} (log: $LOG/apt.log)"
    # The packages' postinsts would start the stock daemons against /etc/slurm/slurm.conf (which may be
    # our link) and /etc/munge; deny that unless the machine already has a policy.
    local own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 update &&
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends "${missing[@]}"
    } >>"$LOG/apt.log" 2>&1 || rc=$?
    [ "$own_policy" -eq 0 ] || rm -f /usr/sbin/policy-rc.d
    [ "$rc" -eq 0 ] || die "apt-get install of ${missing[*]} failed" "$LOG/apt.log"
}

# ---------------------------------------------------------------- configs
write_configs() {
    local mem_mb node_mem i name
    mem_mb=$(($(awk '/^MemTotal:/ { print $2 }' /proc/meminfo) / 1024))
    node_mem=$((mem_mb / NODES))

    mkdir -p "$S/fakegpu"
    for ((i = 0; i < GPUS; i++)); do
        # gres File= must stat as a char device, else slurmd sets no CUDA_VISIBLE_DEVICES.
        ln -sfn /dev/null "$S/fakegpu/nvidia$i"
    done

    local gres_line="" gres_conf_file=""
    if [ "$GPUS" -gt 0 ]; then
        gres_line=" Gres=gpu:$GPUS"
        if [ "$GPUS" -eq 1 ]; then gres_conf_file="$S/fakegpu/nvidia0"; else gres_conf_file="$S/fakegpu/nvidia[0-$((GPUS - 1))]"; fi
    fi

    local acct
    if [ "$ACCOUNTING" = 1 ]; then
        # AccountingStoragePass: slurmctld->slurmdbd ignores AuthInfo's socket and would use /run/munge.
        # The host is the controller's address (the bridge for multi-node) because sacct run inside a
        # node's namespace talks to slurmdbd directly, and 127.0.0.1 there is the node's own loopback.
        acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTLD_ADDR
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK
AccountingStorageTRES=gres/gpu"
    else
        acct="AccountingStorageType=accounting_storage/none"
    fi

    local spool pidf logf comm
    if [ "$MULTI" -eq 0 ]; then
        # No %n here: slurmd needs the dir to exist before it expands anything.
        spool="$S/spool/slurmd"; pidf="$RUN/slurmd.pid"; logf="$LOG/slurmd.log"
        comm="CommunicationParameters=NoInAddrAny"
    else
        spool="$S/spool/%n"; pidf="$RUN/slurmd-%n.pid"; logf="$LOG/slurmd-%n.log"
        # NoInAddrAny would bind slurmd to 10.77.0.1I only, and srun run on the host (which binds to
        # what this hostname resolves to, 127.0.0.1) could then not be reached for task I/O.
        comm="# no NoInAddrAny: see the script"
    fi

    cat >"$CONF.tmp" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$S/state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$pidf
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$logf
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
$comm
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
# A node that stops answering is DOWN after 20 s, not the default 300 s: its jobs fail or requeue
# within a minute, and it returns to service when its slurmd registers again.
SlurmdTimeout=20
MinJobAge=600
GresTypes=gpu
$acct
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
EOF
    if [ "$MULTI" -eq 0 ]; then
        echo "NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$node_mem$gres_line State=UNKNOWN" >>"$CONF.tmp"
    else
        for ((i = 1; i <= NODES; i++)); do
            echo "NodeName=node$i NodeAddr=$NET.1$i NodeHostname=node$i CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$node_mem$gres_line State=UNKNOWN" >>"$CONF.tmp"
        done
    fi
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF.tmp"
    mv -f "$CONF.tmp" "$CONF"

    {
        echo "AutoDetect=off"
        [ -z "$gres_conf_file" ] || echo "Name=gpu File=$gres_conf_file"
    } >"$S/etc/gres.conf"

    if [ "$ACCOUNTING" = 1 ]; then
        local pass
        # The database only listens on 127.0.0.1, but a fixed password would be shared by every machine.
        if [ ! -s "$S/mysql/slurm.pass" ]; then
            (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$S/mysql/slurm.pass")
        fi
        pass="$(cat "$S/mysql/slurm.pass")"
        (
            umask 077
            cat >"$S/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=$CTLD_ADDR
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
        )
        chmod 600 "$S/etc/slurmdbd.conf"
    fi

    if [ "$MULTI" -eq 1 ]; then
        {
            echo "127.0.0.1 localhost"
            echo "$CTLD_ADDR $HOST mn-ctld"
            for ((i = 1; i <= NODES; i++)); do echo "$NET.1$i node$i"; done
        } >"$S/etc/hosts"
        # No DNS inside the nodes; a closed local resolver fails lookups at once instead of timing out.
        echo "nameserver 127.0.0.1" >"$S/etc/resolv.conf"
    fi

    for name in $(node_names); do
        [ "$MULTI" -eq 0 ] || mkdir -p "$S/spool/$name" "$RUN/cg-$name"
    done
    [ "$MULTI" -eq 1 ] || mkdir -p "$S/spool/slurmd"
}

# ---------------------------------------------------------------- daemons
start_munged() {
    pid_of munged "$RUN/munged.pid" >/dev/null && return 0
    rm -f "$RUN/munged.pid"
    if [ ! -s "$S/munge/munge.key" ]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$S/munge/munge.key" >>"$LOG/munged.log" 2>&1 ||
                die "mungekey could not create $S/munge/munge.key" "$LOG/munged.log"
        else
            dd if=/dev/urandom of="$S/munge/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chmod 400 "$S/munge/munge.key"
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    munged --key-file="$S/munge/munge.key" --socket="$MUNGE_SOCK" --pid-file="$RUN/munged.pid" \
        --log-file="$LOG/munged.log" --seed-file="$S/munge/munged.seed" >>"$LOG/munged.log" 2>&1 ||
        die "munged did not start" "$LOG/munged.log"
    wait_daemon munged "$RUN/munged.pid" "$LOG/munged.log" 15 "does not answer on $MUNGE_SOCK" munge_ok
}

db_ok() { mariadb-admin --no-defaults -S "$S/mysql/mysqld.sock" -u root ping; }

start_mariadb() {
    pid_of mariadbd "$RUN/mariadbd.pid" >/dev/null && return 0
    rm -f "$RUN/mariadbd.pid"
    # A half-initialised datadir (install interrupted) is redone from scratch.
    if [ ! -e "$S/mysql/initialized" ]; then
        rm -rf "$S/mysql/data"
        mkdir -p "$S/mysql/data"
        mariadb-install-db --no-defaults --user=root --datadir="$S/mysql/data" \
            --auth-root-authentication-method=socket --skip-test-db >>"$LOG/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed" "$LOG/mariadb-install.log"
    fi
    # lock-wait-timeout and a pool above 256M are what slurmdbd asks for; the pool is only reserved.
    port_free_or_die "$DB_PORT" mariadbd
    setsid -f mariadbd --no-defaults --user=root --datadir="$S/mysql/data" --socket="$S/mysql/mysqld.sock" \
        --pid-file="$RUN/mariadbd.pid" --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
        --log-error="$LOG/mariadbd.log" --innodb-lock-wait-timeout=900 --innodb-buffer-pool-size=1024M \
        </dev/null >>"$LOG/mariadbd.log" 2>&1
    wait_daemon mariadbd "$RUN/mariadbd.pid" "$LOG/mariadbd.log" 60 "does not answer on port $DB_PORT" db_ok
    if [ ! -e "$S/mysql/initialized" ]; then
        local pass
        pass="$(cat "$S/mysql/slurm.pass")"
        mariadb --no-defaults -S "$S/mysql/mysqld.sock" -u root >>"$LOG/mariadb-install.log" 2>&1 <<EOF ||
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
            die "could not create the slurm database user" "$LOG/mariadb-install.log"
        touch "$S/mysql/initialized"
    fi
}

# start_slurm_daemon NAME PORT SECONDS WHAT CHECK...: slurmdbd and slurmctld fork themselves into the
# background and write $RUN/NAME.pid (see write_configs), then CHECK says when they serve.
start_slurm_daemon() {
    local name="$1" port="$2" limit="$3" what="$4"
    shift 4
    pid_of "$name" "$RUN/$name.pid" >/dev/null && return 0
    rm -f "$RUN/$name.pid"
    port_free_or_die "$port" "$name"
    "$name" >>"$LOG/$name.log" 2>&1 || die "$name did not start" "$LOG/$name.log"
    wait_daemon "$name" "$RUN/$name.pid" "$LOG/$name.log" "$limit" "$what" "$@"
}

start_slurmd() {  # start_slurmd NODENAME
    local name="$1" i
    pid_of slurmd "$(slurmd_pidfile "$name")" >/dev/null && return 0
    # slurmd kills whatever pid its pid file names, so a stale one (after a crash or a reboot) must go.
    rm -f "$(slurmd_pidfile "$name")"
    if [ "$MULTI" -eq 0 ]; then
        port_free_or_die "$SLURMD_PORT" slurmd
        slurmd -N "$name" >>"$(slurmd_log "$name")" 2>&1 || die "slurmd did not start" "$(slurmd_log "$name")"
        return 0
    fi
    i="${name#node}"
    # Not `ip netns exec`: its fresh /sys hides the cgroup mounts slurmd 22.05 insists on. Own UTS and
    # mount namespaces give the node its hostname and /etc/hosts, so jobs see node1, node2, ... and
    # torch/gloo bind to the node's address rather than the host's loopback.
    # shellcheck disable=SC2016  # $1/$2 expand in the inner shell
    nsenter --net="/run/netns/mn-$name" unshare --uts --mount -- /bin/sh -c '
        set -e
        mount --bind "$1/etc/hosts" /etc/hosts
        mount --bind "$1/etc/resolv.conf" /etc/resolv.conf
        mount --rbind /sys/fs/cgroup "$1/run/cg-$2"
        mount -t sysfs sysfs /sys
        mount --move "$1/run/cg-$2" /sys/fs/cgroup
        hostname "$2"
        exec slurmd -N "$2"' sh "$S" "$name" >>"$(slurmd_log "$name")" 2>&1 ||
        die "slurmd for $name did not start" "$(slurmd_log "$name")"
}

host_veths() { ip -o link show 2>/dev/null | awk -F': ' '$2 ~ /^mnv[0-9]+@/ { sub(/@.*/, "", $2); print $2 }'; }

setup_network() {
    local i ns
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
    fi
    ip addr replace "$CTLD_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for ((i = 1; i <= NODES; i++)); do
        ns="mn-node$i"
        [ -e "/run/netns/$ns" ] || ip netns add "$ns"
        # A veth left from a namespace that is gone has no eth0 on the other side.
        if ip link show "mnv$i" >/dev/null 2>&1 && ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
            ip link del "mnv$i"
        fi
        if ! ip link show "mnv$i" >/dev/null 2>&1; then
            ip link add "mnv$i" type veth peer name eth0 netns "$ns"
        fi
        ip link set "mnv$i" master "$BRIDGE" up
        ip -n "$ns" addr replace "$NET.1$i/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    done
}

# ---------------------------------------------------------------- readiness
# Waits until every node is usable (idle, or busy with jobs), resuming nodes that an earlier run left
# drained or down.
wait_nodes_ready() {
    local t0=$SECONDS name state bad seen n
    while :; do
        bad=""
        seen=0
        while read -r name state; do
            [ -n "$name" ] || continue
            seen=1
            case "$state" in
                idle|mix|alloc|comp) ;;
                drain|drng|down|inval|fail|failg)
                    scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true
                    bad="$bad $name($state)" ;;
                *) bad="$bad $name($state)" ;;
            esac
        done < <(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
        [ "$seen" -eq 1 ] || bad=" (sinfo lists no nodes)"
        [ -n "$bad" ] || return 0
        if [ $((SECONDS - t0)) -ge 3 ]; then
            for n in $(node_names); do
                pid_of slurmd "$(slurmd_pidfile "$n")" >/dev/null ||
                    die "slurmd for $n exited during startup" "$(slurmd_log "$n")"
            done
        fi
        if [ $((SECONDS - t0)) -ge 60 ]; then
            local logs="$LOG/slurmctld.log"
            for n in $(node_names); do logs="$logs $(slurmd_log "$n")"; done
            die "nodes not idle after 60 s:$bad" "$logs"
        fi
        sleep 0.5
    done
}

# ---------------------------------------------------------------- verbs
any_slurm_daemon_up() {
    local n
    pid_of slurmctld "$RUN/slurmctld.pid" >/dev/null && return 0
    pid_of slurmdbd "$RUN/slurmdbd.pid" >/dev/null && return 0
    for n in "$RUN"/slurmd*.pid; do
        [ -e "$n" ] || continue
        pid_of slurmd "$n" >/dev/null && return 0
    done
    return 1
}

link_etc() {
    [ "$MULTI" -eq 0 ] && [ "${SLURM_LOCAL_LINK_ETC:-1}" = 1 ] || return 0
    # Plain clients (and submitit) read /etc/slurm/slurm.conf; never replace someone else's file.
    if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
        return 0
    fi
    if [ -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then
        return 0
    fi
    mkdir -p /etc/slurm
    ln -s "$CONF" /etc/slurm/slurm.conf
}

cmd_start() {
    [ "$(id -u)" -eq 0 ] || die "start needs root (daemons run as root; multi-node needs namespaces)"
    mkdir -p "$S" "$LOG" "$RUN" "$S/etc" "$S/state" "$S/spool" "$S/mysql"
    # munged refuses a socket dir that is not searchable by all.
    mkdir -p "$S/munge"
    chmod 755 "$S" "$S/munge"
    install_packages

    if [ "$MULTI" -eq 1 ] && pid_of slurmctld "$RUN/slurmctld.pid" >/dev/null; then
        local have
        have="$(configured_nodes)"
        [ "$have" = "$NODES" ] || die "the multi-node cluster in $S is up with $have nodes, not $NODES; stop it first"
    fi
    # Rewriting the configs under running daemons would make them disagree with each other.
    if ! any_slurm_daemon_up; then
        write_configs
    fi
    link_etc

    start_munged
    [ "$MULTI" -eq 0 ] || setup_network
    if accounting_configured; then
        start_mariadb
        # slurmctld gives up if the database is not there when it registers its TRES.
        start_slurm_daemon slurmdbd "$DBD_PORT" 60 "is not listening on port $DBD_PORT" port_listening "$DBD_PORT"
    fi
    start_slurm_daemon slurmctld "$CTLD_PORT" 30 "does not answer scontrol ping" ctld_ok
    local n
    for n in $(node_names); do start_slurmd "$n"; done
    wait_nodes_ready
    echo "local slurm cluster up: $NODES node(s), $GPUS gpu(s) each, SLURM_CONF=$CONF"
}

cancel_jobs() {
    ctld_ok || return 0
    local ids
    ids="$(squeue -h -o '%A' 2>/dev/null || true)"
    [ -n "$ids" ] || return 0
    # shellcheck disable=SC2086
    scancel $ids >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 15))
    while [ -n "$(squeue -h -o '%A' 2>/dev/null || true)" ] && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.3
    done
}

cmd_stop() {
    [ -d "$S" ] || { [ "$MULTI" -eq 0 ] && return 0; }
    cancel_jobs
    local pids=() p f
    # slurmd(s) and slurmctld together: neither needs the other to exit.
    for f in "$RUN"/slurmd*.pid; do
        [ -e "$f" ] || continue
        p="$(pid_of slurmd "$f")" && pids+=("$p")
    done
    p="$(pid_of slurmctld "$RUN/slurmctld.pid")" && pids+=("$p")
    stop_pids "${pids[@]}"
    # slurmdbd after slurmctld so the last job records still reach the database.
    pids=()
    p="$(pid_of slurmdbd "$RUN/slurmdbd.pid")" && pids+=("$p")
    stop_pids "${pids[@]}"
    pids=()
    p="$(pid_of mariadbd "$RUN/mariadbd.pid")" && pids+=("$p")
    p="$(pid_of munged "$RUN/munged.pid")" && pids+=("$p")
    stop_pids "${pids[@]}"

    if [ "$MULTI" -eq 1 ]; then
        local ns
        # Job processes that left their step (setsid ... &) survive slurmd and would keep a
        # namespace and its veth alive after `ip netns del`.
        for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^mn-node[0-9]+$/ { print $1 }'); do
            mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null || true)
            stop_pids "${pids[@]}"
            ip netns del "$ns" 2>/dev/null || true
        done
        ip link del "$BRIDGE" 2>/dev/null || true
        # The kernel frees a namespace (and the host end of its veth) asynchronously; a leftover mnvI
        # would make the next start reuse a veth whose peer is gone.
        local t0=$SECONDS veths
        while veths="$(host_veths)" && [ -n "$veths" ]; do
            if [ $((SECONDS - t0)) -ge 5 ]; then
                for f in $veths; do ip link del "$f" 2>/dev/null || true; done
                break
            fi
            sleep 0.2
        done
    fi
}

cmd_status() {
    local up=1 p n f
    if [ ! -r "$CONF" ]; then
        echo "not started: no $CONF"
        DIED=1
        exit 3
    fi
    show() {  # show LABEL NAME PIDFILE
        if p="$(pid_of "$2" "$3")"; then
            echo "$1: running (pid $p)"
        else
            echo "$1: not running"
            up=0
        fi
    }
    show munged munged "$RUN/munged.pid"
    if accounting_configured; then
        show mariadbd mariadbd "$RUN/mariadbd.pid"
        show slurmdbd slurmdbd "$RUN/slurmdbd.pid"
    fi
    show slurmctld slurmctld "$RUN/slurmctld.pid"
    if [ "$MULTI" -eq 0 ]; then
        show "slurmd $HOST" slurmd "$RUN/slurmd.pid"
    else
        while read -r n; do
            show "slurmd $n" slurmd "$(slurmd_pidfile "$n")"
        done < <(awk -F'[= ]' '/^NodeName=/ { print $2 }' "$CONF")
    fi
    if ctld_ok; then
        timeout 20 sinfo || up=0
    else
        echo "slurmctld does not answer (SLURM_CONF=$CONF)"
        up=0
    fi
    if [ "$up" -ne 1 ]; then
        DIED=1
        exit 3
    fi
}

cmd_exec() {
    [ $# -ge 2 ] || die "usage: exec NODE CMD... (NODE is node1, node2, ... of the multi-node cluster)"
    local name="$1"
    shift
    case "$name" in [0-9]*) name="node$name" ;; esac
    local p
    p="$(pid_of slurmd "$RUN/slurmd-$name.pid")" ||
        die "no running slurmd for $name in $S (is the multi-node cluster started?)" "$LOG/slurmd-$name.log"
    DIED=1  # from here on the exit status is CMD's
    exec nsenter --target "$p" --net --uts --mount -- "$@"
}

case "$VERB" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    exec) cmd_exec "$@" ;;
    *) usage ;;
esac
