#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, with accounting (slurmdbd + MariaDB), for the Slurm tests.
#
#   scripts/slurm-cluster.sh start DIR   # configure and start munged, mariadbd, slurmdbd, slurmctld, slurmd
#   scripts/slurm-cluster.sh stop DIR    # stop exactly the daemons that `start` recorded in DIR/pids
#
# Everything lives in DIR (configs, state, logs, the database). Prints the slurm.conf path on success;
# export SLURM_CONF to it. Needs root and Debian's packages slurmctld slurmd slurm-client munge slurmdbd
# mariadb-server (scripts/install-test-deps.sh installs them).
set -euo pipefail

cmd=${1:?usage: slurm-cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: slurm-cluster.sh start|stop DIR}")

stop() {
    [[ -f $dir/pids ]] || return 0
    trap - ERR
    # cancel this cluster's jobs first: a task's processes (a kernel training for hours) must not outlive it
    if [[ -f $dir/slurm.conf ]]; then
        SLURM_CONF=$dir/slurm.conf scancel -u "$(id -un)" 2>/dev/null || true
        for _ in $(seq 100); do
            [[ -z $(SLURM_CONF=$dir/slurm.conf squeue -h 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    # reverse order of start: slurmd, slurmctld, slurmdbd, mariadbd, munged
    tac "$dir/pids" | while read -r name pid; do
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -f "$dir/pids"
    if [[ -f $dir/dbdir ]]; then rm -rf "$(cat "$dir/dbdir")" "$dir/dbdir"; fi
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    echo "slurm-cluster: $what did not come up in ${seconds}s; logs in $dir" >&2
    return 1
}

start_bg() {  # start_bg NAME COMMAND... : run in the background, record the PID
    local name=$1; shift
    "$@" >"$dir/log/$name.out" 2>&1 &
    echo "$name $!" >> "$dir/pids"
}

if [[ $cmd == stop ]]; then stop; exit 0; fi
trap 'echo "slurm-cluster: failed at line $LINENO; logs in $dir/log" >&2' ERR
[[ $cmd == start ]] || { echo "usage: slurm-cluster.sh start|stop DIR" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "slurm-cluster: must run as root" >&2; exit 1; }
for exe in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sacctmgr; do
    command -v "$exe" >/dev/null || { echo "slurm-cluster: $exe not found (install slurmctld slurmd slurm-client munge slurmdbd mariadb-server)" >&2; exit 1; }
done

stop
mkdir -p "$dir"/{log,state,spool}
# the database lives where the mysql user can reach it (DIR may sit under a private folder, e.g. pytest's)
db=$(mktemp -d /tmp/bnlib-slurm-db.XXXXXX)
echo "$db" > "$dir/dbdir"
host=$(hostname -s)
# RealMemory below what slurmd detects, else the node drains
mem=$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') - 512 ))
cpus=$(nproc)

# munge: the key exists after Debian's install; the daemon needs /run/munge
mkdir -p /run/munge && chown munge:munge /run/munge
[[ -s /etc/munge/munge.key ]] || { mungekey -c -k /etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
if ! munge -n >/dev/null 2>&1; then
    start_bg munged runuser -u munge -- munged -F
    wait_for 10 munged munge -n
fi

# MariaDB for slurmdbd, private to DIR
mariadb-install-db --user=mysql --datadir="$db" --auth-root-authentication-method=normal >"$dir/log/mariadb-install.out" 2>&1
chown -R mysql:mysql "$db"
start_bg mariadbd mariadbd --user=mysql --datadir="$db" --socket="$db/mysql.sock" --port=3307 --bind-address=127.0.0.1 --pid-file="$db/mariadb.pid"
wait_for 30 mariadbd mariadb --socket="$db/mysql.sock" -e "select 1"
for h in localhost 127.0.0.1; do
    mariadb --socket="$db/mysql.sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'$h' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'$h';"
done

cat > "$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurm
StoragePort=3307
PidFile=$dir/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
EOF
chmod 600 "$dir/slurmdbd.conf"   # slurmdbd refuses a readable config (it holds the password)

cat > "$dir/slurm.conf" <<EOF
ClusterName=bnlib
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$dir/slurm.conf

start_bg slurmdbd slurmdbd -D   # reads slurmdbd.conf beside $SLURM_CONF
wait_for 30 slurmdbd sacctmgr -n list cluster
sacctmgr -i add cluster bnlib >/dev/null 2>&1 || true
start_bg slurmctld slurmctld -D -i -c -f "$dir/slurm.conf"
wait_for 30 slurmctld scontrol ping
start_bg slurmd slurmd -D -N "$host" -f "$dir/slurm.conf"
wait_for 30 "slurmd (node idle)" bash -c "sinfo -h -N -o %T | grep -qx idle"
echo "$dir/slurm.conf"
