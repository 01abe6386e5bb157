"""`ray submit` as a user types it: Ray's cluster launcher (`ray up` with the local provider of
examples/cluster-local.yaml) over a real sshd on loopback, `ray submit CLUSTER.yaml dump/dump_labels.py -- ...`,
a verified store equal to a dump without Ray, `ray down`.

The head node is this machine, reached over SSH: sshd runs in a PID namespace of its own (`unshare`), with root's
home moved to a folder of the test (a private bind mount of /etc/passwd), so that what the launcher runs there
(`ray stop` included, which stops every Ray process it can see) sees only the test's processes and writes only
into the test's folder. Killing the namespace's first process ends everything in it.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
import zarr

from core.checkpoint import save_checkpoint
from dump.dump_labels import dump

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("sshd", "rsync", "unshare", "ssh-keygen")
BRIDGE = """import os, socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    while data := os.read(0, 65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    os.write(1, data)
"""


def missing_tools() -> list[str]:
    paths = {tool: shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin") for tool in TOOLS}
    return [tool for tool, path in paths.items() if path is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def ssh_head():
    """An sshd on loopback in its own PID namespace, root's home there a folder of the test; yields what a
    cluster config needs to reach it."""
    missing = missing_tools()
    if missing:
        if os.environ.get("TOKENLABEL_REQUIRE_SSHD"):  # .ci/run installs them: there, skipping would hide a failure
            pytest.fail(f"missing {missing}")
        pytest.skip(f"needs {', '.join(missing)} (Debian: openssh-server rsync util-linux)")
    if os.geteuid() != 0:
        pytest.skip("the launcher logs in as root to this machine")
    tmp = Path(tempfile.mkdtemp(prefix="tlrs", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    home, port = tmp / "home", free_port()
    home.mkdir()
    for name in ("client", "host"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True)
    shutil.copy(tmp / "client.pub", tmp / "authorized_keys")
    (tmp / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp / 'host'}\nAuthorizedKeysFile {tmp / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        f"StrictModes no\nUsePAM no\nPidFile {tmp / 'sshd.pid'}\n")
    passwd = [line if not line.startswith("root:") else ":".join([*line.split(":")[:5], str(home), line.split(":")[6]])
              for line in Path("/etc/passwd").read_text().splitlines()]
    (tmp / "passwd").write_text("\n".join(passwd) + "\n")
    # the head's shell: this Python and this checkout, and a Ray temp folder of its own
    profile = (f"export PATH={Path(sys.executable).parent}:$PATH PYTHONPATH={ROOT} RAY_TMPDIR={tmp / 'r'}\n"
               "unset RAY_ADDRESS\n")
    for name in (".profile", ".bashrc"):
        (home / name).write_text(profile)
    (tmp / "bridge.py").write_text(BRIDGE)
    proxy = tmp / "proxy"
    proxy.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp / 'bridge.py'} {port}\n")
    proxy.chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
    sshd = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/sbin")
    server = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c",
                               f"mount --bind {tmp / 'passwd'} /etc/passwd && exec {sshd} -D -e -f {tmp / 'sshd_config'}"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "sshd.log", "w"), start_new_session=True)
    ssh_dirs = set(Path("/tmp").glob("ray_ssh_*/*"))
    try:
        deadline = time.monotonic() + 30
        while not listening(port):
            assert server.poll() is None and time.monotonic() < deadline, (tmp / "sshd.log").read_text()
            time.sleep(0.2)
        yield {"tmp": tmp, "key": tmp / "client", "proxy": proxy, "home": home}
    finally:
        server.kill()  # unshare --kill-child: its death kills the namespace's first process, and so all of it
        server.wait(timeout=30)
        left = processes_of(tmp, wait=15)  # the launcher's ssh master and its proxy end once sshd is gone
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        for path in set(Path("/tmp").glob("ray_ssh_*/*")) - ssh_dirs:  # the launcher's ssh control sockets
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"processes still running 15 s after the cluster ended (killed now): {left}"


def processes_of(folder: Path, wait: float) -> list[int]:
    """Pids of the processes whose command line names `folder`, after waiting up to `wait` s for them to end."""
    deadline = time.monotonic() + wait
    while True:
        pids = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if str(folder).encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:  # it ended meanwhile
                pass
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.2)


def cluster_config(head: dict, name: str) -> Path:
    """examples/cluster-local.yaml as a user edits it for this machine: head_ip, user and key (reached through
    the test's sshd port), a Ray port of its own, and no install step (the head runs this checkout)."""
    config = yaml.safe_load((ROOT / "examples" / "cluster-local.yaml").read_text())
    config["cluster_name"] = name
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(head["key"]), "ssh_proxy_command": str(head["proxy"])}
    config.update(file_mounts={}, setup_commands=[])
    config["head_start_ray_commands"] = [
        command.replace("--port=6379", f"--port={free_port()} --node-ip-address=127.0.0.1 --num-cpus=2 "
                                       f"--include-dashboard=false") for command in config["head_start_ray_commands"]]
    path = head["tmp"] / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launcher(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_ray_submit_through_the_cluster_launcher_writes_a_verified_store(ssh_head, demo_shards, tmp_path):
    import labeler  # noqa: F401  (registers the demo FAN)

    torch.manual_seed(0)
    model = timm.create_model("fan_demo_tiny_p8", num_classes=10)
    checkpoint = tmp_path / "last.pt"
    save_checkpoint(checkpoint, model_name="fan_demo_tiny_p8", num_classes=10, img_size=64, model=model, ema=model,
                    train_state={"epoch": 1})
    name = f"tlrs-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    config = cluster_config(ssh_head, name)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TMPDIR"] = str(ssh_head["tmp"])  # the launcher's own caches
    out = tmp_path / "submitted.zarr"
    try:
        up = launcher("up", "-y", "--no-config-cache", str(config), env=env)
        assert up.returncode == 0, (up.stdout + up.stderr)[-3000:]
        submit = launcher("submit", "--no-config-cache", str(config), "dump/dump_labels.py", "--",
                          "--shards", str(demo_shards), "--checkpoint", str(checkpoint), "--out", str(out),
                          "--topk", "5", "--batch-size", "4", env=env)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
        assert f"wrote {out}" in submit.stdout
    finally:
        down = launcher("down", "-y", str(config), env=env, timeout=120)
        for suffix in ("state", "lock"):  # the local provider's record of the cluster
            Path(f"/tmp/ray/cluster-{name}.{suffix}").unlink(missing_ok=True)
    assert down.returncode == 0, (down.stdout + down.stderr)[-3000:]
    drivers = list((ssh_head["tmp"] / "r" / "ray").glob("session_*/logs/python-core-driver-*.log"))
    assert drivers, "the dump did not run as a driver of the launcher's cluster"
    verify = subprocess.run([sys.executable, "-m", "dump.verify", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stdout.startswith("ok:"), verify.stderr
    reference = tmp_path / "local.zarr"
    dump(demo_shards, checkpoint, reference, topk=5, batch_size=4, engine="local", workers=0)
    submitted, local = zarr.open_group(out, mode="r"), zarr.open_group(reference, mode="r")
    for array in ("scores", "classes", "keys", "valid"):
        assert np.array_equal(submitted[array][:], local[array][:], equal_nan=array == "scores"), array
    assert (ssh_head["home"] / "dump_labels.py").is_file()  # `ray submit` copied the script to the head's home


def test_a_copy_of_the_script_alone_without_tokenlabel_is_one_line(tmp_path):
    """What `ray submit` makes of dump/dump_labels.py on a node where tokenlabel is not installed (python -S:
    no site-packages, so no installed tokenlabel)."""
    alone = tmp_path / "dump_labels.py"
    shutil.copy(ROOT / "dump" / "dump_labels.py", alone)
    run = subprocess.run([sys.executable, "-S", str(alone), "--help"], cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith(f"error: {alone} runs alone here and tokenlabel is not installed") and \
        len(run.stderr.splitlines()) == 1
