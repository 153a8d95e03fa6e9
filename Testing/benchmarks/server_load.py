"""``probsam serve`` under load on loopback: answers correct, none lost, busy answers, memory and threads flat.

    python Testing/benchmarks/server_load.py --requests 300 --clients 6 --backlog 2
    python Testing/benchmarks/server_load.py --requests 300 --clients 6 --backlog 2 --retries 4

Starts the server as its own process (``probsam serve --model file`` with a tiny random ProbSAM on the CPU),
runs ``--warmup`` jobs, reads the server's resident memory (VmRSS) and thread count from /proc, then sends
``--requests`` jobs from ``--clients`` threads (ProbSAMLib.app.remote.RemoteJob, busy answers retried
``--retries`` times), compares every result with the same job run locally, and reads memory and threads
again. Linux only (/proc). Figures are printed, not asserted: they depend on the machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ProbSAMLib import save_probsam  # noqa: E402
from ProbSAMLib.app.jobs import ModelCache, SampleJob  # noqa: E402
from ProbSAMLib.app.remote import RemoteJob, ServerBusy, test_connection  # noqa: E402
from Testing.helpers import diverse_tiny_model  # noqa: E402

TOKEN = "load-test-token-0123456789"


def proc_status(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--backlog", type=int, default=2)
    parser.add_argument("--retries", type=int, default=0, help="busy answers a client sits out (default 0)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="probsam_load_"))
    weights = folder / "tiny.safetensors"
    save_probsam(diverse_tiny_model(), weights)
    request = {"model": {"name": "file", "device": "cpu"}, "ijk_to_ras": np.eye(4), "size_ijk": (20, 18, 4),
               "lo": (5, 4, 0), "hi": (14, 12, 4), "n_samples": args.samples, "seed": 3}
    local = SampleJob({**request, "model": {**request["model"], "checkpoint": str(weights)}}, ModelCache())
    k0, k1, r0, r1, c0, c1 = local.region
    values = np.random.default_rng(0).normal(-700, 150, (k1 - k0, r1 - r0, c1 - c0)).astype(np.float32)
    reference = local.run(values)

    server = subprocess.Popen([sys.executable, "-m", "ProbSAMLib.app.cli", "serve", "--model", "file", "--checkpoint",
                               str(weights), "--device", "cpu", "--port", "0", "--max-backlog", str(args.backlog),
                               "--rate-limit", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PROBSAM_SERVER_TOKEN": TOKEN})
    try:
        url = server.stdout.readline().split(" at ")[1].split("/v1")[0]
        print(test_connection(url, TOKEN))
        remote = {**request, "server": {"url": url, "token": TOKEN, "retries": args.retries}}

        def one_job() -> str:
            try:
                result = RemoteJob(remote).run(values)
            except ServerBusy:
                return "busy"
            except Exception as error:  # noqa: BLE001 - counted as lost, printed below
                return f"lost: {error}"
            same = all(np.array_equal(reference[k], result[k]) for k in reference
                       if isinstance(reference[k], np.ndarray))
            return "correct" if same else "wrong"

        for _ in range(args.warmup):
            one_job()
        before = proc_status(server.pid)
        outcomes, lock, left = Counter(), threading.Lock(), [args.requests]

        def client() -> None:
            while True:
                with lock:
                    if not left[0]:
                        return
                    left[0] -= 1
                outcome = one_job()
                with lock:
                    outcomes[outcome] += 1

        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        time.sleep(1.0)  # let finished connections close
        after = proc_status(server.pid)
        info = test_connection(url, TOKEN)
    finally:
        server.terminate()
        server.wait(10)

    lost = sum(n for k, n in outcomes.items() if k.startswith("lost") or k == "wrong")
    print(f"requests {args.requests}, clients {args.clients}, backlog {args.backlog}, retries {args.retries}, "
          f"samples {args.samples}, region {values.shape}")
    print(f"correct {outcomes['correct']}, busy {outcomes['busy']}, lost or wrong {lost} "
          f"({ {k: n for k, n in outcomes.items() if k not in ('correct', 'busy')} })")
    print(f"server RSS {before['rss_mib']:.1f} MiB -> {after['rss_mib']:.1f} MiB "
          f"({after['rss_mib'] - before['rss_mib']:+.1f}); threads {before['threads']} -> {after['threads']}")
    print(f"wall {wall:.1f} s, {args.requests / wall:.1f} requests/s; after: {info}")


if __name__ == "__main__":
    main()
