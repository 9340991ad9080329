#!/usr/bin/env python3
"""Decisions per second through `EvaluateBatch` against single `Evaluate` calls, on one
`agentca serve` per audit mode, measured with h2load (a load generator in C, so the two cores
go to the server). Both carry the request of `examples/request.json`: a single call one
decision, a batch `--items` copies of it, each decided and audited on its own. Runs alternate,
3 rounds, medians. Each run's decisions are checked against the server's own count
(`agentca_decisions_total`), since h2load counts a gRPC error as a success.

Run from the project root after `cargo build --release`:
    python3 benches/grpc_batch.py [--items 100] [--rounds 3] [--seconds 8] [--modes off,buffered,fsync]

Installs what it needs on first use: h2load (Debian `nghttp2-client`) and a Python venv with
grpcio-tools under the temp folder (to encode the requests from the project's own proto)."""
import argparse, json, os, pathlib, re, shutil, socket, statistics, subprocess, sys, tempfile, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--items", type=int, default=100)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--seconds", type=int, default=8)
ap.add_argument("--request", default="examples/request.json")
ap.add_argument("--policies", default="policies")
ap.add_argument("--binary", default="target/release/agentca")
ap.add_argument("--modes", default="off,buffered,fsync", help="audit modes to run, comma separated")
args = ap.parse_args()

venv = pathlib.Path(tempfile.gettempdir()) / "agentca-bench-venv"
if os.environ.get("AGENTCA_BENCH_INNER") != "1":
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "grpcio-tools"], check=True)
    if not shutil.which("h2load"):
        subprocess.run(["apt-get", "update", "-qq"])
        subprocess.run(["apt-get", "install", "-y", "-qq", "nghttp2-client"])
    os.environ["AGENTCA_BENCH_INNER"] = "1"
    os.execv(str(venv / "bin" / "python"), [str(venv / "bin" / "python"), *sys.argv])

from grpc_tools import protoc
import grpc_tools

work = pathlib.Path(tempfile.mkdtemp(prefix="agentca-batch-"))
gen = work / "gen"
gen.mkdir()
inc = str(pathlib.Path(grpc_tools.__file__).parent / "_proto")
if protoc.main(["protoc", "-Iproto", f"-I{inc}", f"--python_out={gen}", "agentca/v1/agentca.proto"]) != 0:
    sys.exit("the proto does not compile")
sys.path.insert(0, str(gen))
from agentca.v1 import agentca_pb2 as pb

req = pb.EvaluateRequest()
for k, v in json.loads(pathlib.Path(args.request).read_text()).items():
    if v is None:
        continue
    if isinstance(v, list):
        getattr(req, k).extend(v)
    else:
        setattr(req, k, v)
batch = pb.EvaluateBatchRequest()
batch.requests.extend([req] * args.items)


def framed(name, message):
    raw = message.SerializeToString()
    path = work / name
    path.write_bytes(b"\x00" + len(raw).to_bytes(4, "big") + raw)
    return path


calls = {
    "single": (framed("single.bin", req), "Evaluate", 1),
    f"batch of {args.items}": (framed("batch.bin", batch), "EvaluateBatch", args.items),
}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


procs = []
servers = {}


def start_servers():
    for mode in args.modes.split(","):
        port, metrics = free_port(), free_port()
        audit = ["--audit", "off"] if mode == "off" else ["--audit", str(work / f"{mode}.jsonl"), "--audit-durability", mode]
        log = open(work / f"{mode}.log", "w")
        procs.append(subprocess.Popen([args.binary, "serve", "--policies", args.policies, "--listen", f"127.0.0.1:{port}",
                                       "--metrics-listen", f"127.0.0.1:{metrics}", "--state", str(work / f"state-{mode}"),
                                       *audit], stdout=log, stderr=log))
        for _ in range(150):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            sys.exit(f"audit {mode} did not start: {(work / f'{mode}.log').read_text()[-300:]}")
        servers[mode] = (port, metrics)



def decisions(metrics):
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(r"^agentca_decisions_total\{[^}]*\} ([\d.e+]+)$", text, re.M))


def h2(port, metrics, body, method, items):
    before = decisions(metrics)
    out = subprocess.run(["h2load", "-c", "4", "-m", "16", "-D", str(args.seconds), "--warm-up-time", "1",
                          "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(body),
                          f"http://127.0.0.1:{port}/agentca.v1.DecisionService/{method}"],
                         capture_output=True, text=True).stdout
    counted = decisions(metrics) - before
    rps, done = re.search(r"([\d.]+) req/s", out), re.search(r"(\d+) succeeded", out)
    if not (rps and done):
        sys.exit(f"{method}: h2load gave no figures:\n{out[-500:]}")
    rps, done = float(rps.group(1)), int(done.group(1))
    # The server counts the warm-up's decisions too: at least every measured one must be there.
    if counted < done * items:
        sys.exit(f"{method}: h2load saw {done} answers of {items} decisions, the server counted {counted:.0f}")
    return rps * items


try:
    # Inside the try: a server that does not start stops those started before it.
    start_servers()
    res = {(mode, call): [] for mode in servers for call in calls}
    for r in range(args.rounds):
        for mode, (port, metrics) in servers.items():
            for call, (body, method, items) in calls.items():
                dps = h2(port, metrics, body, method, items)
                res[(mode, call)].append(dps)
                print(f"round {r + 1} audit {mode:9s} {call:13s} {dps:10.0f} decisions/s", flush=True)
finally:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=20)

print(f"\nmedians (64 calls in flight on 4 connections):")
print(f"{'audit':10s} {'single decisions/s':>19s} {f'batch of {args.items}':>14s} {'batch / single':>15s}")
for mode in servers:
    single = statistics.median(res[(mode, "single")])
    batched = statistics.median(res[(mode, f"batch of {args.items}")])
    print(f"{mode:10s} {single:19.0f} {batched:14.0f} {batched / single:15.2f}")
