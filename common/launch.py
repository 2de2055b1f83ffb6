"""Start N TensorFlow workers on this machine: ``python -m common.launch --workers N -m MODULE ARGS``.

The TF counterpart of ``torchrun --standalone --nproc-per-node N -m MODULE ARGS``: it
picks N free ports on 127.0.0.1, starts ``python -m MODULE ARGS`` N times with the
``TF_CONFIG`` that makes process i worker i of the cluster (what
``tf.distribute.MultiWorkerMirroredStrategy`` reads), forwards SIGINT/SIGTERM to
every worker, and exits with the first failing worker's exit code (0 when all end well).

TensorFlow's gRPC server listens on every network interface whatever ``TF_CONFIG``
says (the address is hard-coded in ``grpc_server_lib.cc``), so the workers would accept
connections from the whole network. This launcher therefore refuses to start unless the
process is in a private network namespace whose only interface is loopback::

    unshare -rn sh -c 'ip link set lo up && python -m common.launch --workers 2 -m tf2_impl.run_nn'
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

from common.errors import UserError

PRIVATE = ("unshare -rn sh -c 'ip link set lo up && python -m common.launch ...'")


def free_ports(count):
    """`count` distinct TCP ports free on 127.0.0.1 now; OSError when 127.0.0.1 cannot
    be reached (a new network namespace starts with its loopback interface down)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        sockets[0].listen()
        socket.create_connection(sockets[0].getsockname(), timeout=5).close()
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports, index):
    """The TF_CONFIG of worker `index` in a cluster of local workers on `ports`."""
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                       "task": {"type": "worker", "index": index}})


def check_private_network(interfaces=None):
    """Refuse unless loopback is this network namespace's only interface."""
    interfaces = [name for _, name in socket.if_nameindex()] if interfaces is None else interfaces
    exposed = sorted(name for name in interfaces if name != "lo")
    if exposed:
        raise UserError(f"TensorFlow's workers listen on every interface and this process can "
                        f"reach {', '.join(exposed)}; run the launcher in a private network "
                        f"namespace: {PRIVATE}")


def parse_args(argv=None):
    """--workers N -m MODULE, then MODULE's own arguments (everything after it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m common.launch",
                                     usage="python -m common.launch --workers N -m MODULE [ARGS]",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, required=True, help="number of worker processes")
    parser.add_argument("-m", dest="module", required=True, help="the entry point to start")
    split = argv.index("-m") + 2 if "-m" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.args = argv[split:]
    if args.workers < 2:
        raise UserError(f"--workers {args.workers}: a multi-worker run needs at least 2; run "
                        f"python -m {args.module} directly for one")
    return args


def launch(args):
    """Start the workers and wait for them; the exit code of the run."""
    try:
        ports = free_ports(args.workers)
    except OSError:
        raise UserError(f"no port on 127.0.0.1 can be opened (is the loopback interface down?); "
                        f"bring it up first: {PRIVATE}") from None
    workers = [subprocess.Popen([sys.executable, "-m", args.module, *args.args],
                                env={**os.environ, "TF_CONFIG": tf_config(ports, i)})
               for i in range(args.workers)]

    def forward(signum, frame):
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    while True:
        codes = [worker.poll() for worker in workers]
        failed = [code for code in codes if code not in (None, 0)]
        if failed or all(code == 0 for code in codes):
            break
        time.sleep(0.2)
    # A failed worker leaves the others waiting in an all-reduce: stop them.
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        worker.wait()
    return failed[0] if failed else 0


def main(argv=None):
    try:
        args = parse_args(argv)
        check_private_network()
        code = launch(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
