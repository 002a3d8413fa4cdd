#!/usr/bin/env bash
# make cluster-up: a one-machine SLURM cluster and an MLflow tracking server on PostgreSQL, all on
# 127.0.0.1, so that `make sweep hydra/launcher=slurm tracking=remote` runs for real here.
#
#   make cluster-up        # installs the Debian packages if missing (root), starts what is not running
#   make cluster-down      # stops what this script started (by PID file); data stays in .cluster/
#
# Started, each as a daemon with its PID file, config, state and log under .cluster/:
#   munged     authentication for SLURM (a key made here, its own socket)
#   mariadbd   SLURM's accounting database (slurmdbd needs MySQL/MariaDB)
#   slurmdbd   job accounting: submitit asks `sacct` whether a job ended (a killed job is
#              otherwise waited for forever)
#   slurmctld + slurmd   one node, partition `cpu` sized from nproc and the memory
#   postgres   (as the postgres user) the MLflow backend store
#   mlflow server        runs/metrics in PostgreSQL, artefacts under .cluster/mlflow/artifacts
# Passwords are generated on first start into .cluster/secrets/ (mode 0600) and reach the
# daemons through the environment (PGPASSWORD) or their private config file (slurmdbd.conf).
# Without root it starts nothing and prints the steps an administrator would take.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PACKAGES="slurm-wlm slurmdbd munge mariadb-server postgresql"

manual_steps() {
    cat <<EOF
make cluster-up needs root (daemons run as root, postgres and mysql; packages come from apt).
Nothing was started. As root, or on a real site with your administrator:
  1. apt-get install $PACKAGES
  2. make cluster-up             (as root: starts munged, MariaDB, slurmdbd, slurmctld, slurmd,
                                  PostgreSQL and the MLflow server on 127.0.0.1)
On a real cluster, skip all of this and point the project at the site's services:
  export MLFLOW_TRACKING_URI=https://mlflow.example.org   (credentials: MLFLOW_TRACKING_USERNAME/PASSWORD)
  make sweep hydra/launcher=slurm tracking=remote hydra.launcher.partition=<partition>
(README, "Sweeps on a cluster").
EOF
}

install_packages() {
    local missing=()
    for cmd in munged mungekey slurmctld slurmd slurmdbd sbatch sacctmgr mariadbd mariadb-install-db; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [[ -n $PGBIN && -x $PGBIN/initdb ]] || missing+=(initdb)
    ((${#missing[@]} == 0)) && return 0
    say "installing Debian packages ($PACKAGES): missing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # the packages must not start their system-wide services (MariaDB on 3306, PostgreSQL on
    # 5432, ...): a policy-rc.d answering 101 ("not allowed") for the install, if none is there
    local policy=/usr/sbin/policy-rc.d made=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -q --no-install-recommends $PACKAGES >/dev/null
    [[ -z $made ]] || { rm -f "$policy"; trap - EXIT; }
    PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
}

check_python() {
    "$PY" -c 'import mlflow, psycopg2, submitit' 2>/dev/null && return 0
    say "error: $PY lacks mlflow, psycopg2 or submitit -> run make setup (requirements/base.txt)"
    exit 1
}

secret() {  # secret NAME: print the password, creating it on first use
    local f="$SECRETS/$1"
    if [[ ! -s $f ]]; then
        (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(20))' >"$f")
    fi
    cat "$f"
}

start_munge() {
    if pid=$(running_pid "$MUNGE/run/munged.pid" munged); then say "munged: running (pid $pid)"; return; fi
    # munged refuses a socket directory without o+x and a key others can read
    mkdir -p "$MUNGE/run" && chmod 755 "$MUNGE" "$MUNGE/run"
    mkdir -p -m 700 "$MUNGE/etc"
    [[ -s $MUNGE/etc/munge.key ]] || mungekey -c -k "$MUNGE/etc/munge.key" >/dev/null
    munged --key-file="$MUNGE/etc/munge.key" --socket="$MUNGE_SOCKET" --origin=127.0.0.1 \
        --pid-file="$MUNGE/run/munged.pid" --log-file="$MUNGE/munged.log" \
        --seed-file="$MUNGE/etc/munged.seed"
    wait_for "munge -S '$MUNGE_SOCKET' -n" 10 munged
    say "munged: started (socket $MUNGE_SOCKET)"
}

start_mariadb() {
    if pid=$(running_pid "$MARIADB/run/mariadbd.pid" mariadbd); then say "mariadbd: running (pid $pid)"; return; fi
    mkdir -p "$MARIADB/run" && chown mysql:mysql "$MARIADB" "$MARIADB/run" && chmod 750 "$MARIADB"
    if [[ ! -d $MARIADB/data/mysql ]]; then
        mariadb-install-db --user=mysql --datadir="$MARIADB/data" --skip-test-db \
            --auth-root-authentication-method=socket >"$MARIADB/install.log" 2>&1
    fi
    # a small buffer pool: the accounting of a few hundred jobs is kilobytes
    runuser -u mysql -- setsid /usr/sbin/mariadbd --no-defaults --datadir="$MARIADB/data" \
        --socket="$MARIADB/run/mysqld.sock" --pid-file="$MARIADB/run/mariadbd.pid" \
        --port="$MARIADB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --innodb-buffer-pool-size=32M --log-error="$MARIADB/mariadbd.log" </dev/null >/dev/null 2>&1 &
    wait_for "mariadb -S '$MARIADB/run/mysqld.sock' -u root -e 'select 1'" 60 mariadbd
    local pw; pw=$(secret slurmdbd)
    mariadb -S "$MARIADB/run/mysqld.sock" -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
    say "mariadbd: started (127.0.0.1:$MARIADB_PORT)"
}

write_slurm_conf() {
    local cpus mem_mb
    cpus=$(nproc)
    # leave a fifth of the memory (at least 1 GiB) to the daemons and the MLflow server
    mem_mb=$(awk '/MemTotal/ {m = int($2 / 1024); r = int(m / 5); if (r < 1024) r = 1024; print m - r}' /proc/meminfo)
    mkdir -p "$SLURM/state" "$SLURM/spool" "$SLURM/log"
    # container-friendly plugins: no cgroups, no systemd (linuxproc tracks a job's processes)
    cat >"$SLURM/slurm.conf" <<EOF
# Written by scripts/cluster/up.sh; rewritten at each start. One node on 127.0.0.1.
ClusterName=quantpipe
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=$SLURM/state
SlurmdSpoolDir=$SLURM/spool
SlurmctldPidFile=$SLURM/slurmctld.pid
SlurmdPidFile=$SLURM/slurmd.pid
SlurmctldLogFile=$SLURM/log/slurmctld.log
SlurmdLogFile=$SLURM/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$SLURMDBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
KillWait=10
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    (umask 077; cat >"$SLURM/slurmdbd.conf" <<EOF
# Written by scripts/cluster/up.sh (mode 0600: it holds the database password).
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$SLURMDBD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
PidFile=$SLURM/slurmdbd.pid
LogFile=$SLURM/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MARIADB_PORT
StorageUser=slurm
StoragePass=$(secret slurmdbd)
StorageLoc=slurm_acct_db
EOF
    )
}

start_slurm() {
    local ctld dbd slurmd
    ctld=$(running_pid "$SLURM/slurmctld.pid" slurmctld) || ctld=
    dbd=$(running_pid "$SLURM/slurmdbd.pid" slurmdbd) || dbd=
    slurmd=$(running_pid "$SLURM/slurmd.pid" slurmd) || slurmd=
    [[ -n $ctld || -n $dbd || -n $slurmd ]] || write_slurm_conf
    if [[ -n $dbd ]]; then say "slurmdbd: running (pid $dbd)"; else
        slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
        wait_for "sacctmgr -n list cluster" 30 slurmdbd
        sacctmgr -n list cluster format=cluster | grep -qw quantpipe ||
            sacctmgr -i add cluster quantpipe >/dev/null
        say "slurmdbd: started (port $SLURMDBD_PORT)"
    fi
    if [[ -n $ctld ]]; then say "slurmctld: running (pid $ctld)"; else
        slurmctld
        wait_for "scontrol ping | grep -q UP" 30 slurmctld
        say "slurmctld: started (127.0.0.1:$SLURMCTLD_PORT)"
    fi
    if [[ -n $slurmd ]]; then say "slurmd: running (pid $slurmd)"; else
        slurmd
        say "slurmd: started (127.0.0.1:$SLURMD_PORT)"
    fi
    wait_for "sinfo -h -n '$NODE' -o %t | grep -Eq 'idle|mix|alloc'" 30 "node $NODE"
}

start_postgres() {
    local pg=(runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PG/data")
    mkdir -p "$PG" && chown postgres:postgres "$PG" && chmod 700 "$PG"
    if [[ ! -s $PG/data/PG_VERSION ]]; then
        runuser -u postgres -- "$PGBIN/initdb" -D "$PG/data" -U postgres -E UTF8 \
            --auth-local=peer --auth-host=scram-sha-256 >"$CLUSTER_DIR/postgres-initdb.log" 2>&1
        local fresh=1
    fi
    if pid=$("${pg[@]}" status 2>/dev/null | sed -n 's/.*PID: \([0-9]*\).*/\1/p') && [[ -n $pid ]]; then
        say "postgres: running (pid $pid)"
    else
        runuser -u postgres -- mkdir -p "$PG/run"
        "${pg[@]}" -l "$PG/postgres.log" -w -t 60 start \
            -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=$PG/run" >/dev/null
        say "postgres: started (127.0.0.1:$PG_PORT, data $PG/data)"
    fi
    if [[ ${fresh:-0} == 1 ]]; then  # the password goes through stdin, not the command line
        runuser -u postgres -- "$PGBIN/psql" -q -h "$PG/run" -p "$PG_PORT" -v ON_ERROR_STOP=1 <<SQL
CREATE ROLE mlflow LOGIN PASSWORD '$(secret postgres)';
CREATE DATABASE mlflow OWNER mlflow;
SQL
    fi
}

mlflow_pid() {  # the MLflow server this script started, if it is still that process
    local pid
    pid=$(head -n1 "$MLF/server.pid" 2>/dev/null | tr -dc 0-9) || return 1
    [[ -n $pid ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "mlflow server .*--port $MLFLOW_PORT" &&
        echo "$pid"
}

start_mlflow() {
    if pid=$(mlflow_pid); then say "mlflow server: running (pid $pid)"; return; fi
    mkdir -p "$MLF/artifacts"
    # setsid: the server and its workers form one process group that cluster-down stops.
    # No job execution: it serves GenAI jobs (unused here) with 8 more processes, ~1 GB of RAM.
    PGPASSWORD=$(secret postgres) MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$PY" -m mlflow server \
        --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 2 \
        --backend-store-uri "postgresql+psycopg2://mlflow@127.0.0.1:$PG_PORT/mlflow" \
        --artifacts-destination "$MLF/artifacts" </dev/null >>"$MLF/server.log" 2>&1 &
    local pid=$!
    echo $pid >"$MLF/server.pid"
    # the first start creates MLflow's tables in PostgreSQL (~30 s on 2 busy cores)
    wait_for "kill -0 $pid && curl -sf $MLFLOW_URI/health || ! kill -0 $pid" 180 "mlflow server"
    if ! kill -0 $pid 2>/dev/null; then
        say "error: the mlflow server exited; the end of $MLF/server.log:"; tail -n 5 "$MLF/server.log"
        exit 1
    fi
    say "mlflow server: started ($MLFLOW_URI, pid $pid)"
}

write_env() {
    cat >"$CLUSTER_DIR/cluster.mk" <<EOF
# Written by make cluster-up, removed by make cluster-down; the Makefile includes it.
export SLURM_CONF := $SLURM_CONF
export MLFLOW_TRACKING_URI ?= $MLFLOW_URI
EOF
    cat >"$CLUSTER_DIR/env" <<EOF
# source .cluster/env: SLURM commands (sinfo, squeue, sacct) and MLflow clients use this cluster
export SLURM_CONF=$SLURM_CONF
export MLFLOW_TRACKING_URI=$MLFLOW_URI
EOF
}

main() {
    if [[ $EUID -ne 0 ]]; then manual_steps; exit 2; fi
    install_packages
    check_python
    mkdir -p "$CLUSTER_DIR" && chmod 755 "$CLUSTER_DIR"
    mkdir -p -m 700 "$SECRETS"
    start_munge
    start_mariadb
    start_slurm
    start_postgres
    start_mlflow
    write_env
    cat <<EOF

cluster up (state, logs and data under $CLUSTER_DIR):
  SLURM       partition cpu: node $NODE, $(nproc) CPUs; slurmctld 127.0.0.1:$SLURMCTLD_PORT, slurmd 127.0.0.1:$SLURMD_PORT
              accounting: slurmdbd :$SLURMDBD_PORT (munge-authenticated) -> MariaDB 127.0.0.1:$MARIADB_PORT
  PostgreSQL  127.0.0.1:$PG_PORT, database mlflow (password in $SECRETS/postgres)
  MLflow      $MLFLOW_URI  (UI and API; artefacts in $MLF/artifacts)
Use it:   make sweep hydra/launcher=slurm tracking=remote SWEEP=int8,gguf_q4_k_m
          make report tracking=remote;  make ui tracking=remote
          source $CLUSTER_DIR/env; squeue; sacct
Stop it:  make cluster-down
EOF
}

main "$@"
