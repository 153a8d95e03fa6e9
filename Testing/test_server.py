"""``probsam serve`` and its client (ProbSAMLib.app.server, ProbSAMLib.app.remote): a job over real HTTP on
loopback gives the same arrays as the job run locally; concurrent clients get a correct answer or "busy",
none is lost and the server keeps nothing afterwards; every bad request gets its status and one line; a
server killed mid-job is reported clearly and a restarted one works; TLS; the start-up refusals.

The model is a tiny random ProbSAM saved as a .safetensors file (``--model file --checkpoint``), on the CPU.
"""

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from ProbSAMLib import save_probsam  # noqa: E402
from ProbSAMLib.app import cli, wire  # noqa: E402
from ProbSAMLib.app.jobs import ModelCache, RequestError, SampleJob  # noqa: E402
from ProbSAMLib.app.remote import RemoteError, RemoteJob, ServerBusy, test_connection  # noqa: E402
from ProbSAMLib.app.server.app import Limits, create_app  # noqa: E402
from ProbSAMLib.app.server.command import bind, make_server  # noqa: E402
from ProbSAMLib.app.server.jobqueue import JobQueue  # noqa: E402
from ProbSAMLib.app.server.model import ServedModel  # noqa: E402
from ProbSAMLib.app.server.protocol import PROTOCOL_HEADER, WIRE_TYPE, client_headers  # noqa: E402
from ProbSAMLib.errors import Cancelled  # noqa: E402
from Testing.helpers import diverse_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("server") / "tiny.safetensors"
    save_probsam(diverse_tiny_model(), path)
    return path


@pytest.fixture(scope="module")
def served(weights):
    return ServedModel("file", weights, device="cpu")


def sample_request(weights, seed=3, **changes):
    request = {"model": {"name": "file", "checkpoint": str(weights), "device": "cpu"}, "ijk_to_ras": np.eye(4),
               "size_ijk": (20, 18, 4), "lo": (5, 4, 0), "hi": (14, 12, 4), "n_samples": 4, "seed": seed}
    return {**request, **changes}


def block(region, seed=0):
    k0, k1, r0, r1, c0, c1 = region
    values = np.random.default_rng(seed).normal(-700, 150, (k1 - k0, r1 - r0, c1 - c0)).astype(np.float32)
    values[:, 3:9, 4:10] = 40.0  # something nodule-like, so masks are not empty
    return values


@pytest.fixture(scope="module")
def reference(weights):
    """The job run locally (jobs.SampleJob, as the Slicer worker runs it): the CT block and its result."""
    job = SampleJob(sample_request(weights), ModelCache())
    values = block(job.region)
    return job.region, values, job.run(values)


@contextlib.contextmanager
def running_server(models, limits=Limits(token=TOKEN, rate_per_s=0), max_backlog=4, certfile=None, keyfile=None):
    """A real server on 127.0.0.1 (a free port) in a thread: (its URL, its JobQueue)."""
    jobs = JobQueue(models, max_backlog=max_backlog).start()
    server = make_server(create_app(models, jobs, limits), certfile, keyfile)
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"{'https' if certfile else 'http'}://127.0.0.1:{sock.getsockname()[1]}", jobs
    finally:
        server.should_exit = True
        thread.join(10)
        jobs.stop()
        sock.close()


def plain(value, drop=("timings_s",)):
    """A result field with arrays as (dtype, shape, bytes) and tuples as lists, for exact comparison."""
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items() if key not in drop}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value.item() if isinstance(value, np.generic) else value


def assert_same_result(local, remote):
    assert set(local) == set(remote)
    for name in local:
        if name != "model":  # which process loaded it differs; name and SHA-256 must not
            assert plain(local[name]) == plain(remote[name]), name
    assert {k: remote["model"][k] for k in ("name", "sha256")} == {k: local["model"][k] for k in ("name", "sha256")}


def remote_request(weights, url, token=TOKEN, **server):
    return {**sample_request(weights), "type": "sample", "id": 1, "server": {"url": url, "token": token, **server}}


# --- end to end --------------------------------------------------------------------------------------------
def test_remote_job_gives_the_local_arrays_and_leaves_nothing_on_the_server(weights, served, reference):
    region, values, local = reference
    assert local["masks"].shape == (4, 4, 8, 9) and plain(local["masks"][0]) != plain(local["masks"][1])
    with running_server(served) as (url, jobs):
        line = test_connection(url, TOKEN)
        assert line.startswith("connected to probsam ") and "model file" in line and served.sha256[:12] in line
        assert "device cpu" in line
        job = RemoteJob(remote_request(weights, url))
        assert job.region == region and job.warning is None
        seen = []
        remote = job.run(values, progress=lambda fraction, message: seen.append((fraction, message)))
        assert_same_result(local, remote)
        assert remote["lo"] == (5, 4, 0) and remote["model"]["server"] == url
        assert seen[-1] == (1.0, "done") and all(0 <= f <= 1 for f, _ in seen)
        info = jobs.info()
        assert info["states"] == {} and info["counts"]["fetched"] == 1  # the result went out once and was dropped


def test_concurrent_clients_get_a_correct_result_or_busy_and_none_is_lost(weights, served, reference):
    """6 threads x 3 jobs against a backlog of 2, busy answers not retried: each job either returns the
    reference arrays or ServerBusy; every busy answer is one the server counted; nothing is held afterwards."""
    _, values, local = reference
    outcomes, lock = [], threading.Lock()
    with running_server(served, max_backlog=2) as (url, jobs):
        def client():
            for _ in range(3):
                try:
                    remote = RemoteJob(remote_request(weights, url, retries=0)).run(values)
                    assert_same_result(local, remote)
                    outcome = "correct"
                except ServerBusy as error:
                    assert "busy" in str(error) and "\n" not in str(error)
                    outcome = "busy"
                except Exception as error:  # a wrong answer or a lost request: recorded, then asserted on
                    outcome = f"failed: {error!r}"
                with lock:
                    outcomes.append(outcome)

        threads = [threading.Thread(target=client) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        info = jobs.info()
    print(f"\n18 jobs, 6 clients, backlog 2: {outcomes.count('correct')} correct, {outcomes.count('busy')} busy")
    assert len(outcomes) == 18 and set(outcomes) <= {"correct", "busy"}, outcomes
    assert outcomes.count("correct") >= 2 and outcomes.count("busy") == info["counts"].get("busy", 0)
    assert info["states"] == {} and info["counts"]["fetched"] == outcomes.count("correct")


def test_cancelled_remote_job_raises_cancelled_and_the_server_drops_it(weights, served, reference):
    _, values, _ = reference
    with running_server(served) as (url, jobs):
        job = RemoteJob(remote_request(weights, url))
        with pytest.raises(Cancelled):
            job.run(values, cancel=lambda: True)
        deadline = time.monotonic() + 10
        while jobs.info()["states"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert jobs.info()["states"] == {}


# --- bad requests ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app_client(served):
    """The app through starlette's TestClient (no socket), with a 64 KiB request limit."""
    from fastapi.testclient import TestClient

    jobs = JobQueue(served, max_backlog=2).start()
    with TestClient(create_app(served, jobs, Limits(token=TOKEN, max_request_bytes=64 * 1024, rate_per_s=0))) as c:
        yield c
    jobs.stop()


def assert_error(answer, status, kind, *words):
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error", "kind"} and body["kind"] == kind and "\n" not in body["error"], body
    for word in words:
        assert word in body["error"], body["error"]
    return body["error"]


def new_job(client, weights, **changes):
    changes.setdefault("model", {"name": "file", "device": "cpu"})  # no file names: the server has its own
    request = json.loads(json.dumps({**sample_request(weights), **changes}, default=lambda a: a.tolist()))
    return client.post("/v1/jobs", json=request, headers=client_headers(TOKEN))


def test_bad_requests_are_answered_with_their_status_and_one_line(app_client, weights, served, tmp_path):
    c, headers = app_client, client_headers(TOKEN)
    assert c.get("/v1/health").json() == {"status": "ok"}  # no token, no handshake
    assert_error(c.get("/v1/info", headers=client_headers("wrong-token-0123456789")), 401, "unauthorized", "token")
    assert_error(c.get("/v1/info", headers=client_headers(None)), 401, "unauthorized")
    newer = {**headers, PROTOCOL_HEADER: "2", "X-ProbSAM-Version": "9.0"}
    assert_error(c.get("/v1/info", headers=newer), 426, "version_mismatch", "update the server to probsam 9.0")
    older = {**headers, PROTOCOL_HEADER: "0"}
    assert_error(c.get("/v1/info", headers=older), 426, "version_mismatch", "update the extension")
    assert_error(c.get("/v1/info", headers={"Authorization": headers["Authorization"]}), 426, "version_mismatch")

    assert_error(new_job(c, weights, n_samples=0), 400, "bad_request", "field 'n_samples'")
    assert_error(new_job(c, weights, hi=(30, 12, 4)), 400, "bad_request", "does not lie inside")
    assert_error(new_job(c, weights, model={"name": "lite_medsam"}), 400, "bad_request", "serves model file",
                 served.sha256, "not model 'lite_medsam'")
    files = new_job(c, weights)
    request = json.loads(json.dumps(sample_request(weights), default=lambda a: a.tolist()))
    assert_error(c.post("/v1/jobs", json=request, headers=headers), 400, "bad_request", "weights files")
    assert_error(c.post("/v1/jobs", content=b"{not json", headers=headers), 400, "bad_request", "not JSON")

    job = files.json()
    assert files.status_code == 202 and len(job["region"]) == 6
    put = f"/v1/jobs/{job['id']}/region"
    wire_headers = {**headers, "Content-Type": WIRE_TYPE}
    assert_error(c.put(put, content=wire.encode({"values": np.zeros((1, 2, 3), np.float32)}), headers=wire_headers),
                 400, "bad_request", "shape (1, 2, 3)")
    assert_error(c.put(put, content=wire.encode({"other": 1}), headers=wire_headers), 400, "bad_request",
                 "field 'values'")
    assert_error(c.put(put, content=wire.encode({"values": np.zeros((1, 2, 3), np.float32)}),
                       headers={**headers, "Content-Type": "application/octet-stream"}), 415, "bad_request", WIRE_TYPE)
    big = wire.encode({"values": np.zeros((20, 30, 30), np.float32)})  # 72 KB > 64 KiB
    assert_error(c.put(put, content=big, headers=wire_headers), 413, "too_large", "65536 bytes")

    marker = tmp_path / "unpickled"  # a pickle that would create this file if the server unpickled it

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    assert_error(c.put(put, content=pickle.dumps({"values": Exploit()}), headers=wire_headers), 400, "bad_request",
                 "not a ProbSAM message")
    assert not marker.exists()

    assert_error(c.get("/v1/jobs/nope", headers=headers), 404, "not_found", "no job nope")
    assert_error(c.get(f"/v1/jobs/{job['id']}/result", headers=headers), 409, "conflict", "awaiting_region")
    assert c.delete(f"/v1/jobs/{job['id']}", headers=headers).json()["state"] == "cancelled"
    assert_error(c.get(f"/v1/jobs/{job['id']}", headers=headers), 404, "not_found")


def test_job_followed_by_server_sent_events_then_fetched_once(app_client, weights, reference):
    region, values, local = reference
    headers = client_headers(TOKEN)
    job = new_job(app_client, weights).json()
    assert tuple(job["region"]) == region
    put = app_client.put(f"/v1/jobs/{job['id']}/region", content=wire.encode({"values": values}),
                         headers={**headers, "Content-Type": WIRE_TYPE})
    assert put.status_code == 200 and put.json()["state"] in ("queued", "running", "done")
    with app_client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=headers) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1]["state"] == "done" and events[-1]["fraction"] == 1.0
    assert [e["version"] for e in events] == sorted({e["version"] for e in events})  # each change once, in order
    answer = app_client.get(f"/v1/jobs/{job['id']}/result", headers=headers)
    assert answer.headers["content-type"] == WIRE_TYPE
    assert_same_result(local, wire.decode(answer.content))
    assert_error(app_client.get(f"/v1/jobs/{job['id']}/result", headers=headers), 404, "not_found")


def test_a_full_backlog_answers_503_busy_with_retry_after(app_client, weights):
    first, second, third = (new_job(app_client, weights) for _ in range(3))
    assert (first.status_code, second.status_code) == (202, 202)
    assert_error(third, 503, "busy", "try again")
    assert int(third.headers["Retry-After"]) > 0
    for answer in (first, second):
        app_client.delete(f"/v1/jobs/{answer.json()['id']}", headers=client_headers(TOKEN))
    assert new_job(app_client, weights).status_code == 202  # room again once they are gone


def test_jobs_whose_client_went_away_expire_but_not_while_their_block_arrives(weights, served):
    jobs = JobQueue(served, region_ttl_s=0.05, result_ttl_s=0.05)
    request = {**sample_request(weights), "model": {"name": "file", "device": "cpu"}}
    forgotten, uploading = jobs.submit(request), jobs.submit(request)
    jobs.begin_upload(uploading.id)
    time.sleep(0.1)
    assert jobs.info()["states"] == {"awaiting_region": 1} and jobs.info()["counts"]["expired"] == 1
    with pytest.raises(KeyError, match=f"no job {forgotten.id} on this server"):
        jobs.status(forgotten.id)
    jobs.end_upload(uploading.id)
    time.sleep(0.1)
    assert jobs.info()["states"] == {} and jobs.info()["counts"]["expired"] == 2


def test_too_many_requests_from_one_client_answer_429(served):
    from fastapi.testclient import TestClient

    jobs = JobQueue(served).start()
    with TestClient(create_app(served, jobs, Limits(rate_per_s=1))) as client:
        answers = [client.get("/v1/health") for _ in range(4)]
    jobs.stop()
    assert [a.status_code for a in answers[:2]] == [200, 200]
    assert_error(answers[3], 429, "rate_limited", "too many requests")


def test_client_errors_name_the_server_and_what_to_do(weights, served, monkeypatch):
    with running_server(served) as (url, _):
        with pytest.raises(RemoteError, match="refused the token"):
            test_connection(url, "wrong-token-0123456789")
        with pytest.raises(RequestError, match="serves model file"):
            RemoteJob({**remote_request(weights, url), "model": {"name": "lite_medsam"}})
        with monkeypatch.context() as patch:  # a client of another protocol version
            patch.setattr("ProbSAMLib.app.remote.client_headers", lambda token: {**client_headers(token),
                                                                                   PROTOCOL_HEADER: "0"})
            with pytest.raises(RemoteError, match="speaks protocol 1 .*: update the extension .* to probsam 0.1.0"):
                test_connection(url, TOKEN)
    with pytest.raises(RemoteError, match=f"cannot reach the probsam server at {url}: connection refused"):
        test_connection(url, TOKEN)
    with pytest.raises(RemoteError, match="must look like https://host:port"):
        test_connection("ftp://example.org", TOKEN)


# --- a server killed and restarted (a real process) -------------------------------------------------------
def start_server_process(weights, port=0):
    process = subprocess.Popen([sys.executable, "-m", "ProbSAMLib.app.cli", "serve", "--model", "file",
                                "--checkpoint", str(weights), "--device", "cpu", "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # the reference ran here: the same CPU thread count gives the same float sums
                               env={**os.environ, "PROBSAM_SERVER_TOKEN": TOKEN,
                                    "OMP_NUM_THREADS": str(torch.get_num_threads())})
    line = process.stdout.readline()
    assert line.startswith("probsam serve: model file"), (line, process.stderr.read() if process.poll() else "")
    return process, line.split(" at ")[1].split("/v1")[0]


def test_server_killed_mid_job_is_reported_and_a_restarted_one_works(weights, reference):
    region, values, local = reference
    process, url = start_server_process(weights)
    try:
        orphan = RemoteJob(remote_request(weights, url))  # submitted; its CT block never reaches this server
        lost = RemoteJob(remote_request(weights, url))
        process.kill()
        process.wait(10)
        with pytest.raises(RemoteError, match=r"connection refused.*job .* is lost: run it again"):
            lost.run(values)
        process, again = start_server_process(weights, port=int(url.rsplit(":", 1)[1]))
        assert again == url
        with pytest.raises(RemoteError, match="no job .* the server restarted"):
            orphan.run(values)
        assert_same_result(local, RemoteJob(remote_request(weights, url)).run(values))
    finally:
        process.kill()
        process.wait(10)


# --- TLS and the start-up refusals ------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_server_checks_certificates_and_says_what_went_wrong(served, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                           str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                           "subjectAltName=IP:127.0.0.1"], capture_output=True)
    if made.returncode != 0:  # an openssl without -addext (old LibreSSL)
        pytest.skip(f"openssl could not make a certificate: {made.stderr.decode(errors='replace')[:200]}")
    with running_server(served, certfile=cert, keyfile=key) as (url, _):
        assert test_connection(url, TOKEN, cafile=str(cert)).startswith("connected to probsam")
        with pytest.raises(RemoteError, match="TLS failure .*certificate"):
            test_connection(url, TOKEN)
        with pytest.raises(RemoteError, match="closed the connection"):
            test_connection(url.replace("https", "http"), TOKEN)
    with running_server(served) as (url, _):
        with pytest.raises(RemoteError, match=r"TLS failure .*http:// server\?"):
            test_connection(url.replace("http", "https"), TOKEN)


@pytest.mark.parametrize("options, env_token, words", [
    (["--host", "0.0.0.0"], None, "give a token"),
    (["--host", "0.0.0.0"], TOKEN, "--certfile and --keyfile"),
    (["--host", "::"], TOKEN, "--insecure-http"),
    ([], "short", "use at least 16"),
    (["--certfile", "missing.pem"], None, "together"),
])
def test_serve_refuses_unsafe_or_broken_settings_before_loading_a_model(options, env_token, words, monkeypatch,
                                                                       capsys):
    monkeypatch.delenv("PROBSAM_SERVER_TOKEN", raising=False)
    if env_token:
        monkeypatch.setenv("PROBSAM_SERVER_TOKEN", env_token)
    monkeypatch.setattr("ProbSAMLib.app.server.model.ServedModel", None)  # loading a model would fail loudly
    assert cli.main(["serve", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("probsam: error: ") and "\n" not in err and words in err, err


def test_serve_off_loopback_with_token_and_insecure_http_passes_the_checks(tmp_path, monkeypatch):
    from ProbSAMLib.app.server.command import check_options

    monkeypatch.delenv("PROBSAM_SERVER_TOKEN", raising=False)
    (tmp_path / "token").write_text(TOKEN + "\n", encoding="utf-8")
    args = cli.build_parser().parse_args(["serve", "--host", "0.0.0.0", "--insecure-http", "--token-file",
                                          str(tmp_path / "token")])
    assert check_options(args) == (TOKEN, False)


# --- the Slicer worker relaying to a server ---------------------------------------------------------------
def test_worker_relays_a_job_to_the_server_and_tests_the_connection(weights, served, reference):
    """The worker process (what Slicer runs), without torch, with ``server`` in the request: the same window, progress and
    result messages as a local job, the arrays of the local run; "test_connection" answers one line."""
    from ProbSAMLib.app.worker import read_frame, write_frame

    region, values, local = reference
    # torch and torchvision made unimportable: remote mode must run on a laptop without PyTorch
    no_torch = ("import sys; sys.modules['torch'] = sys.modules['torchvision'] = None; "
                "from ProbSAMLib.app import worker; sys.exit(worker.main())")
    worker = subprocess.Popen([sys.executable, "-c", no_torch], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def answer():
        while True:
            message = read_frame(worker.stdout)
            if message["type"] not in ("heartbeat", "progress"):
                return message

    try:
        with running_server(served) as (url, jobs):
            write_frame(worker.stdin, {"type": "test_connection", "id": 1, "server": {"url": url, "token": "bad" * 6}})
            refused = answer()
            assert (refused["type"], refused["kind"]) == ("error", "unauthorized") and "token" in refused["message"]
            write_frame(worker.stdin, {"type": "test_connection", "id": 2, "server": {"url": url, "token": TOKEN}})
            connected = answer()
            assert connected["type"] == "connection" and connected["message"].startswith("connected to probsam")

            write_frame(worker.stdin, remote_request(weights, url) | {"id": 3})
            window = answer()
            assert window["type"] == "window" and tuple(window["region"]) == region
            write_frame(worker.stdin, {"type": "region", "id": 3, "values": values})
            result = answer()
            assert result["type"] == "result", result
            del result["type"], result["id"]
            assert_same_result(local, result)
            assert jobs.info()["states"] == {}

            # cancelled while the worker waits for the CT block: the server's job goes at once, not at expiry
            write_frame(worker.stdin, remote_request(weights, url) | {"id": 4})
            assert answer()["type"] == "window" and jobs.info()["states"]
            write_frame(worker.stdin, {"type": "cancel", "id": 4})
            cancelled = answer()
            assert (cancelled["type"], cancelled["kind"]) == ("error", "cancelled")
            assert jobs.info()["states"] == {}
        write_frame(worker.stdin, {"type": "quit"})
        assert worker.wait(20) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
