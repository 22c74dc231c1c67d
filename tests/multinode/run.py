"""Past one machine, tested on one: two "nodes", each a Linux network namespace with an address of
its own, joined by a veth pair; torchrun on each (`--nnodes 2 --rdzv-backend c10d`), Gloo over real
TCP between the two addresses. Needs root and iproute2 (`make test-multinode` runs it).

    python tests/multinode/run.py [--out DIR]

Checks, each against the single-process dense run of tests/multinode/train.py:
1. tp_dp: tensor parallel across the nodes x data parallel inside them (4 ranks) trains with the
   dense run's losses;
2. pipeline: one stage per node (2 ranks) trains with the dense run's losses;
3. pp_tp: the 3-D mesh's pipeline x tensor parallel (init_mesh(pp=2, tp=2), 4 ranks): one stage per
   node, each stage tensor parallel over its node's two ranks, the activations crossing the link;
   trains with the dense run's losses;
4. kill, for tp_dp and for pp_tp: the job, saving with torch_mp.save every 2 steps; one node dies
   mid-step. The survivors raise torch_mp.CollectiveError within the group's timeout,
   `torchrun --max-restarts 1` restarts them, a new node takes the dead one's place, and the job
   resumes from the last save with the uninterrupted run's losses, bit for bit.
The namespaces (and with them the veth pair and addresses) are removed whatever happens.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "train.py"
PREFIX = "torch_mp-mn-"
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
RUN_TIMEOUT = 240  # seconds for one torchrun job


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


class Nodes:
    """Two namespaces "<prefix><pid>-0" and "-1", addresses 10.213.<n>.1 and .2/24 on a veth pair."""

    def __init__(self):
        self.remove_stale()
        pid = os.getpid()
        self.names = [f"{PREFIX}{pid}-{i}" for i in range(2)]
        self.links = [f"tmpmn{pid % 100000}{'ab'[i]}" for i in range(2)]
        subnet = 10 + pid % 240
        self.addresses = [f"10.213.{subnet}.{i + 1}" for i in range(2)]

    def __enter__(self):
        for name in self.names:
            ip("netns", "add", name)
        ip("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
        for name, link, address in zip(self.names, self.links, self.addresses):
            ip("link", "set", link, "netns", name)
            ip("-n", name, "addr", "add", f"{address}/24", "dev", link)
            ip("-n", name, "link", "set", link, "up")
            ip("-n", name, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc):
        for name in self.names:
            self.kill(name)
            subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)

    @staticmethod
    def kill(name: str) -> None:
        """Every process of the namespace, at once: the node dies."""
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    @staticmethod
    def remove_stale() -> None:
        """Namespaces left by a run that was itself killed (SIGKILL leaves no chance to clean up)."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
        for line in listed:
            name = line.split(" ")[0]
            if name.startswith(PREFIX) and not Path(f"/proc/{name[len(PREFIX):].split('-')[0]}").exists():
                Nodes.kill(name)
                subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)

    def torchrun(self, node: int, job: str, nproc: int, args, out: Path, max_restarts: int = 0, env=None):
        """Starts torchrun on ``node`` (in its namespace); the rendezvous is hosted by node 0."""
        # Each round of the rendezvous publishes the workers' store address again: with torchrun's
        # default (the agents' store shared with the workers) a surviving rank-0 node does not, and a
        # node that replaces a dead one waits for it forever.
        environ = {**os.environ, "GLOO_SOCKET_IFNAME": self.links[node], "OMP_NUM_THREADS": "1",
                   "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})}
        command = [
            "ip", "netns", "exec", self.names[node], sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{self.addresses[0]}:29400", "--rdzv-id", job,
            "--rdzv-conf", f"is_host={node == 0}", "--local-addr", self.addresses[node],
            "--max-restarts", str(max_restarts),
            str(TRAIN), *args, "--out", str(out)]
        log = open(out / f"{job}-node{node}.log", "a")
        return subprocess.Popen(command, env=environ, stdout=log, stderr=subprocess.STDOUT)


def wait(processes, what: str, out: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    for process in processes:
        try:
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{what}: torchrun did not finish within {RUN_TIMEOUT} s; logs in {out}")
        if code != 0:
            raise SystemExit(f"{what}: torchrun exited with {code}; logs in {out}")


def losses(out: Path, scenario: str):
    """{step: loss} from ``scenario``'s log; a step logged twice (before and after a restart) must
    have logged the same bits both times."""
    steps = {}
    for line in (out / f"{scenario}.losses").read_text().split("\n"):
        if line:
            step, value = line.split()
            value = float.fromhex(value)
            if steps.setdefault(int(step), value) != value:
                raise SystemExit(f"{scenario}: step {step} logged {steps[int(step)]!r} and then {value!r}")
    return steps


def compare(name: str, got, expected, exact: bool = False) -> None:
    if sorted(got) != sorted(expected):
        raise SystemExit(f"{name}: steps {sorted(got)}; expected {sorted(expected)}")
    a = torch.tensor([got[s] for s in sorted(got)], dtype=torch.float64)
    b = torch.tensor([expected[s] for s in sorted(expected)], dtype=torch.float64)
    if exact:
        assert torch.equal(a, b), f"{name}: losses {a.tolist()}, expected exactly {b.tolist()}"
    else:
        torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m: f"{name}: {m}")
    print(f"{name}: {len(a)} steps, loss {a[0]:.4f} -> {a[-1]:.4f}, equal to the reference "
          f"({'bit for bit' if exact else 'rtol %g' % TOLERANCE['rtol']})")


def kill_scenario(nodes: Nodes, scenario: str, out: Path, reference) -> None:
    """``scenario`` (2 ranks per node) with node 1 killed mid-step, restarted, resumed."""
    checkpoint = out / "ckpt"
    args = [scenario, "--checkpoint", str(checkpoint)]
    kill_step = 3
    job = f"kill-{scenario}"
    survivor = nodes.torchrun(0, job, 2, args, out, max_restarts=1)
    dying = nodes.torchrun(1, job, 2, args, out, env={"TORCH_MP_TEST_KILL_STEP": str(kill_step)})
    deadline = time.monotonic() + RUN_TIMEOUT
    while len(list(out.glob("dying-rank*.json"))) < 2:
        if time.monotonic() > deadline or survivor.poll() is not None or dying.poll() is not None:
            raise SystemExit(f"kill {scenario}: node 1 never reached step {kill_step}; logs in {out}")
        time.sleep(0.1)
    Nodes.kill(nodes.names[1])
    dying.wait()
    # The survivors' errors, then a new node 1 (as a cluster replaces a dead machine): torchrun on
    # node 0 has restarted its workers and waits for it at the rendezvous.
    while len(errors := sorted(out.glob("error-rank*.json"))) < 2:
        if time.monotonic() > deadline or survivor.poll() is not None:
            raise SystemExit(f"kill {scenario}: {len(errors)} of the 2 survivors wrote their error; logs in {out}")
        time.sleep(0.2)
    for path in errors:
        error = json.loads(path.read_text())
        assert error["type"] == "CollectiveError", error
        assert error["after_s"] < error["timeout_s"] + 5.0, error
        print(f"kill {scenario}: {path.stem[len('error-'):]} raised torch_mp.CollectiveError "
              f"{error['after_s']:.1f} s after node 1 stopped (group timeout {error['timeout_s']:.0f} s): {error['message'][:100]}...")
    replacement = nodes.torchrun(1, job, 2, args, out)
    wait([survivor, replacement], f"kill {scenario} (resumed)", out)
    compare(f"kill: resumed {scenario}", losses(out, scenario), reference, exact=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where the logs and losses go (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="torch_mp-multinode-"))
    start = time.monotonic()
    # SIGTERM (a CI timeout) ends the run through the cleanup below too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("multinode: terminated"))
    (out / "dense").mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(TRAIN), "dense", "--out", str(out / "dense")], check=True)
    dense = losses(out / "dense", "dense")
    with Nodes() as nodes:
        print(f"nodes: {nodes.names[0]} ({nodes.addresses[0]}), {nodes.names[1]} ({nodes.addresses[1]}), "
              f"veth {nodes.links[0]} <-> {nodes.links[1]}")
        for scenario, nproc in (("tp_dp", 2), ("pipeline", 1), ("pp_tp", 2)):
            folder = out / scenario
            folder.mkdir(parents=True, exist_ok=True)
            wait([nodes.torchrun(node, scenario, nproc, [scenario], folder) for node in range(2)], scenario, folder)
            compare(f"{scenario} on 2 nodes", losses(folder, scenario), dense)
        for scenario in ("tp_dp", "pp_tp"):
            folder = out / f"kill-{scenario}"
            folder.mkdir(parents=True, exist_ok=True)
            kill_scenario(nodes, scenario, folder, losses(out / scenario, scenario))
    print(f"multinode: passed in {time.monotonic() - start:.0f} s; logs in {out}")


if __name__ == "__main__":
    main()
