"""A throw-away one-node SLURM cluster on 127.0.0.1, with accounting, for tests/test_slurm.py.

    with one_node_cluster(tmp_dir) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)

Starts munged, MariaDB (in a fresh data folder), slurmdbd, slurmctld and slurmd in the foreground
as child processes, every file in `tmp_dir` (and a link to its slurm.conf at SYSTEM_CONF, see
there); stops them (and only them), removes the link and `tmp_dir` on exit, failure included.
Accounting is real (slurmdbd on MariaDB) because the executor plugin queries job states with
`sacct`, and without slurmdbd `sacct` answers nothing. Needs root (slurmd starts the jobs' steps
as their users) and Debian's slurm-wlm, slurmdbd, munge and mariadb-server.

`python tests/slurm_cluster.py DIR` brings one up and keeps it until Ctrl-C (to try the profile by hand).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "mariadb-install-db", "mysqld", "slurmdbd", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sacct", "sinfo", "scontrol", "sacctmgr", "srun", "mariadb")
PARTITION = "debug"  # the cluster's only (default) partition; the profile's default "gpu" is absent here
CLUSTER = "arpgtest"
# Inside a job the plugin's job step runs `srun` with every SLURM_* variable but the job's identity
# removed, SLURM_CONF too (snakemake-executor-plugin-slurm issue #164): srun finds the cluster only
# through slurm.conf's standard place, so the test cluster's config is linked there while it runs.
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
DB_USER, DB_PASS = "slurm", "arpg-test"


class ClusterStartError(RuntimeError):
    """A daemon did not come up; the message holds its log."""


def missing_requirements() -> str | None:
    """Why a cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "needs root: slurmd starts job steps as the submitting user"
    missing = [b for b in (*DAEMONS, *CLIENTS) if not shutil.which(b, path=f"/usr/sbin:/usr/bin:{os.environ['PATH']}")]
    if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
        return (f"{SYSTEM_CONF} exists (a cluster of this machine's own, or one left by a killed test run: "
                "remove it if so); the test cluster would shadow it")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "the executor plugin is not installed: pip install -e '.[slurm]'"
    if missing:
        return (f"missing {', '.join(missing)}: apt-get install slurm-wlm slurmdbd munge mariadb-server "
                "mariadb-client")
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def node_line() -> str:
    """The node as slurmd sees it (`slurmd -C`: real CPUs, sockets, memory), reachable on 127.0.0.1."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("NodeName="))
    return f"{line} NodeAddr=127.0.0.1"


@dataclass
class Cluster:
    root: Path
    env: dict
    procs: dict = field(default_factory=dict)  # name -> Popen, in start order

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    def run(self, *cmd: str, check: bool = True, timeout: int = 60) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc.stdout


def _write_configs(root: Path, ports: dict) -> None:
    (root / "munge.key").write_bytes(os.urandom(1024))
    (root / "munge.key").chmod(0o600)
    common = f"AuthType=auth/munge\nAuthInfo=socket={root / 'munge.sock'}\n"
    (root / "slurmdbd.conf").write_text(
        common + f"DbdHost=localhost\nDbdAddr=127.0.0.1\nDbdPort={ports['dbd']}\nSlurmUser=root\n"
        f"PidFile={root / 'slurmdbd.pid'}\nLogFile={root / 'log' / 'slurmdbd.log'}\n"
        f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={ports['db']}\n"
        f"StorageUser={DB_USER}\nStoragePass={DB_PASS}\nStorageLoc=slurm_acct_db\n")
    (root / "slurmdbd.conf").chmod(0o600)  # slurmdbd refuses a config others can read (it holds the password)
    (root / "slurm.conf").write_text(
        common + f"ClusterName={CLUSTER}\nSlurmctldHost={socket.gethostname()}(127.0.0.1)\n"
        f"SlurmctldPort={ports['ctld']}\nSlurmdPort={ports['d']}\nSlurmUser=root\n"
        f"StateSaveLocation={root / 'state'}\nSlurmdSpoolDir={root / 'spool'}\n"
        f"SlurmctldPidFile={root / 'slurmctld.pid'}\nSlurmdPidFile={root / 'slurmd.pid'}\n"
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}\nSlurmdLogFile={root / 'log' / 'slurmd.log'}\n"
        # no cgroups in a container: processes are tracked by their parent, no CPU binding
        "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nMpiDefault=none\n"
        # CPUs and memory are consumable: a job asking for more than the node has is refused, as on a real cluster
        "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\n"
        "JobAcctGatherType=jobacct_gather/linux\nJobAcctGatherFrequency=5\n"
        f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
        # for slurmdbd connections the "password" names the munge socket (slurm.conf(5))
        f"AccountingStoragePort={ports['dbd']}\nAccountingStoragePass={root / 'munge.sock'}\n"
        "SchedulerType=sched/backfill\nReturnToService=2\nSlurmdTimeout=300\nInactiveLimit=0\n"
        f"{node_line()}\nPartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n")


def _wait(what: str, ok, cluster: Cluster, proc_name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = cluster.procs.get(proc_name)
        if proc is not None and proc.poll() is not None:
            raise ClusterStartError(f"{proc_name} exited ({proc.returncode}) before {what}:\n{cluster.log(proc_name)}")
        with contextlib.suppress(Exception):
            if ok():
                return
        time.sleep(0.5)
    raise ClusterStartError(f"timed out waiting for {what}:\n{cluster.log(proc_name)}")


def _start(cluster: Cluster, name: str, *cmd: str) -> None:
    log = open(cluster.root / "log" / f"{name}.out", "w")  # noqa: SIM115 - kept open for the daemon's life
    cluster.procs[name] = subprocess.Popen(cmd, env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)


def _start_database(cluster: Cluster, port: int) -> None:
    root = cluster.root
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={root / 'db'}", "--user=root",
                    "--skip-test-db", "--auth-root-authentication-method=socket"],
                   env=cluster.env, capture_output=True, text=True, check=True, timeout=300)
    sock = root / "mysqld.sock"
    _start(cluster, "mysqld", "mysqld", "--no-defaults", f"--datadir={root / 'db'}", "--user=root",
           f"--socket={sock}", f"--port={port}", "--bind-address=127.0.0.1", f"--pid-file={root / 'mysqld.pid'}",
           f"--log-error={root / 'log' / 'mysqld.log'}", "--innodb-buffer-pool-size=32M",
           "--innodb-lock-wait-timeout=900")  # slurmdbd's recommendation
    sql = ["mariadb", "--no-defaults", f"--socket={sock}", "-uroot"]
    _wait("MariaDB to accept connections", lambda: subprocess.run([*sql, "-e", "SELECT 1"], capture_output=True)
          .returncode == 0, cluster, "mysqld")
    cluster.run(*sql, "-e", f"CREATE USER '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASS}';"
                f"GRANT ALL ON slurm_acct_db.* TO '{DB_USER}'@'127.0.0.1';")


def _start_slurm(cluster: Cluster) -> None:
    _start(cluster, "slurmdbd", "slurmdbd", "-D")
    _wait("slurmdbd to answer", lambda: subprocess.run(["sacctmgr", "-n", "show", "cluster"], env=cluster.env,
                                                       capture_output=True, timeout=20).returncode == 0,
          cluster, "slurmdbd")
    # slurmctld registers a cluster it finds in the database only; adding it first gives accounting from job 1
    cluster.run("sacctmgr", "-i", "add", "cluster", CLUSTER)
    _start(cluster, "slurmctld", "slurmctld", "-D", "-i")
    _wait("slurmctld", lambda: cluster.run("scontrol", "ping").count("UP") > 0, cluster, "slurmctld")
    _start(cluster, "slurmd", "slurmd", "-D")
    _wait("the node to be idle", lambda: "idle" in cluster.run("sinfo", "-h", "-o", "%T"), cluster, "slurmd")


def _cancel_jobs(cluster: Cluster, timeout: float = 60) -> None:
    """Cancel every job and wait until slurmd has ended them: a job's slurmstepd is a daemon of its
    own (not in slurmd's process group), so stopping slurmd alone leaves the job's processes running."""
    if "slurmctld" not in cluster.procs or cluster.procs["slurmctld"].poll() is not None:
        return
    with contextlib.suppress(Exception):
        cluster.run("scancel", "--full", "--user", "root", check=False)
        deadline = time.monotonic() + timeout
        while cluster.run("squeue", "-h", "-o", "%i", check=False).strip() and time.monotonic() < deadline:
            time.sleep(1)


def _stop(cluster: Cluster) -> None:
    """Cancel the jobs, then stop the daemons in reverse start order, each by its process id."""
    _cancel_jobs(cluster)
    for name, proc in reversed(list(cluster.procs.items())):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=20)


@contextlib.contextmanager
def one_node_cluster(root: Path):
    """Yields a Cluster whose `env` (SLURM_CONF) points the slurm commands at it; stops it on exit."""
    reason = missing_requirements()
    if reason:
        raise ClusterStartError(reason)
    root = Path(root).resolve()
    for sub in ("log", "state", "spool", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = ("db", "dbd", "ctld", "d")
    ports = dict(zip(names, _free_ports(len(names))))
    _write_configs(root, ports)
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"),
           "PATH": f"/usr/sbin:{os.environ.get('PATH', '')}"}
    cluster = Cluster(root, env)
    SYSTEM_CONF.parent.mkdir(exist_ok=True)
    SYSTEM_CONF.symlink_to(root / "slurm.conf")
    try:
        _start(cluster, "munged", "munged", "-F", "--force", f"--key-file={root / 'munge.key'}",
               f"--socket={root / 'munge.sock'}", f"--pid-file={root / 'munged.pid'}",
               f"--seed-file={root / 'munge' / 'seed'}", f"--log-file={root / 'log' / 'munged.log'}")
        _wait("munged's socket", lambda: (root / "munge.sock").exists(), cluster, "munged")
        _start_database(cluster, ports["db"])
        _start_slurm(cluster)
        yield cluster
    finally:
        _stop(cluster)
        SYSTEM_CONF.unlink()
        shutil.rmtree(root)  # the database alone is ~180 MB; a start failure's logs are in its message


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    # Ctrl-C or `kill PID` stops the cluster (a background job started by a script ignores SIGINT)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with one_node_cluster(Path(sys.argv[1])) as c:
        print(f"export SLURM_CONF={c.env['SLURM_CONF']}\n(Ctrl-C or kill {os.getpid()} stops the cluster)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
