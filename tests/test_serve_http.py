"""The HTTP service through real uvicorn servers on 127.0.0.1: API, bad bodies, limits, reload under load, SIGHUP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx", reason="building the test bundle needs the export extra")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from sasrec_serve import Predictor  # noqa: E402
from sasrec_serve.app import Limits, create_app  # noqa: E402
from sasrec_serve.cli import build_parser  # noqa: E402

from sasrec_jax import cli  # noqa: E402
from tests.serve_bundles import derive_bundle, tiny_bundle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "0123456789abcdef-admin"
SMALL = Limits(max_session_items=5, max_k=7, max_batch=3, max_exclude=4, max_id_chars=10, max_body_bytes=2000)
ADMIN = {"x-admin-token": TOKEN}


def samples(text: str, name: str, **labels) -> list:
    """The samples called `name` whose labels include `labels`, from a /metrics answer (which must parse as the
    Prometheus text format)."""
    return [s for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name and labels.items() <= s.labels.items()]  # fmt: skip


def metric_value(text: str, name: str, **labels) -> float:
    """The sum of those samples: e.g. every request to a path, whatever its method and status."""
    return sum(s.value for s in samples(text, name, **labels))


class Server:
    """uvicorn in a thread, on a socket bound to 127.0.0.1 port 0 (the OS picks a free port)."""

    def __init__(self, app, **config):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.url = f"http://127.0.0.1:{self.address[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def other_bundle(bundle, tmp_path_factory) -> Path:
    """The same model under another manifest, so its model id differs."""
    return derive_bundle(bundle, tmp_path_factory.mktemp("other") / "bundle", manifest={"created": "another day"})


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    """A server with the admin endpoint on, allowed to load any bundle of this test session."""
    app = create_app(bundle, admin_token=TOKEN, bundle_root=tmp_path_factory.getbasetemp())
    with Server(app) as s:
        yield s


@pytest.fixture(scope="module")
def small(bundle):
    """A server with tiny limits and an admin token."""
    with Server(create_app(bundle, limits=SMALL, admin_token="s3cret")) as s:
        yield s


@pytest.fixture(scope="module")
def pred(bundle) -> Predictor:
    return Predictor.load(bundle)


def test_recommend_over_http(server, pred):
    r = httpx.post(f"{server.url}/v1/recommend", json={"items": ["sku3", "sku4", "nope"], "k": 4})
    assert r.status_code == 200
    body = r.json()
    want = pred.recommend(["sku3", "sku4"], k=4)
    assert body["items"] == list(want.items) and body["scores"] == pytest.approx(want.scores)
    assert body["fallback"] is False and body["unknown"] == ["nope"] and body["model"] == pred.sha
    r = httpx.post(f"{server.url}/v1/recommend", json={"items": [], "k": 2, "exclude": ["sku1"]})
    assert r.json()["fallback"] is True and r.json()["items"] == list(pred.recommend([], k=2, exclude=["sku1"]).items)
    sampled = {"items": ["sku3"], "k": 3, "temperature": 1.5, "seed": 11}
    assert httpx.post(f"{server.url}/v1/recommend", json=sampled).json()["items"] == list(
        pred.recommend(["sku3"], k=3, temperature=1.5, seed=11).items
    )


def test_focus_model_probes_and_metrics(server, pred):
    httpx.post(f"{server.url}/v1/recommend/batch", json={"sessions": [["sku1"], []], "k": 3})
    focus = httpx.post(f"{server.url}/v1/session-focus", json={"items": ["sku1", "sku2", "zz"]}).json()
    assert 0 <= focus["focus"] <= 1 and focus["known"] == 2 and focus["unknown"] == ["zz"]
    assert httpx.post(f"{server.url}/v1/session-focus", json={"items": ["sku1"]}).json()["focus"] is None
    info = httpx.get(f"{server.url}/v1/model").json()
    assert info["model"] == pred.sha and info["manifest"]["num_items"] == 20 and info["manifest"]["max_len"] == 8
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready", "model": pred.sha}
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.text
    # this test's own requests (the module's other tests may have run before it, or not)
    assert metric_value(text, "sasrec_requests_total", path="/v1/session-focus", method="POST", status="200") >= 2
    assert metric_value(text, "sasrec_requests_total", path="/readyz", method="GET", status="200") >= 1
    assert metric_value(text, "sasrec_request_seconds_count", path="/v1/recommend/batch") >= 1
    assert samples(text, "sasrec_request_seconds_bucket", path="/v1/recommend/batch", le="+Inf")
    assert [(s.labels, s.value) for s in samples(text, "sasrec_model_info")] == [({"model": pred.sha}, 1)]
    assert metric_value(text, "sasrec_fallbacks_total") >= 1  # the batch's empty session
    assert {s.labels["result"]: s.value for s in samples(text, "sasrec_reloads_total")} == {
        "ok": 0, "error": 0, "busy": 0}  # fmt: skip
    openmetrics = httpx.get(f"{server.url}/metrics", headers={"accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    for accept in ("application/openmetrics-text; version=abc", "text/plain; version=x.1", b"\xff;;=,"):
        r = httpx.get(f"{server.url}/metrics", headers={"accept": accept})  # not understood: the text format
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4"), accept


def test_batch_results_equal_single_requests(server):
    sessions = [["sku1", "sku2"], [], ["zz", "sku9"]]
    batch = httpx.post(f"{server.url}/v1/recommend/batch", json={"sessions": sessions, "k": 3}).json()
    singles = [httpx.post(f"{server.url}/v1/recommend", json={"items": s, "k": 3}).json() for s in sessions]
    assert len(batch["results"]) == len(singles)
    for got, single in zip(batch["results"], singles):
        # the same items, flags and unknowns; scores equal up to float32 rounding (onnxruntime may pick another
        # GEMM kernel for a batch of sessions than for one)
        assert {k: v for k, v in got.items() if k != "scores"} == {
            k: v for k, v in single.items() if k not in ("scores", "model")
        }
        assert got["scores"] == pytest.approx(single["scores"], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/v1/recommend", b"{not json", None),
        ("/v1/recommend", b"[1, 2]", None),
        ("/v1/recommend", b"", None),
        ("/v1/recommend", {"k": 3}, "items"),
        ("/v1/recommend", {"items": "sku1"}, "items"),
        ("/v1/recommend", {"items": ["sku1", None]}, "items"),
        ("/v1/recommend", {"items": [["sku1"]]}, "items"),
        ("/v1/recommend", {"items": [1.5]}, "items"),
        ("/v1/recommend", {"items": [True]}, "items"),
        ("/v1/recommend", {"items": ["sku1"], "k": 0}, "k"),
        ("/v1/recommend", {"items": ["sku1"], "k": -2}, "k"),
        ("/v1/recommend", {"items": ["sku1"], "k": "3"}, "k"),
        ("/v1/recommend", {"items": ["sku1"], "k": 2.5}, "k"),
        ("/v1/recommend", {"items": ["sku1"], "k": 8}, "k"),
        ("/v1/recommend", {"items": ["sku1"] * 6}, "items"),
        ("/v1/recommend", {"items": ["x" * 11]}, "items"),
        ("/v1/recommend", {"items": ["sku1"], "exclude": ["a"] * 5}, "exclude"),
        ("/v1/recommend", {"items": ["sku1"], "temperature": -1}, "temperature"),
        ("/v1/recommend", {"items": ["sku1"], "temperature": "hot"}, "temperature"),
        ("/v1/recommend", {"items": ["sku1"], "seed": -1}, "seed"),
        ("/v1/recommend", {"items": ["sku1"], "exclude_seen": "no"}, "exclude_seen"),
        ("/v1/recommend", {"items": ["sku1"], "kk": 3}, "kk"),
        ("/v1/recommend/batch", {"sessions": [["sku1"]] * 4}, "sessions"),
        ("/v1/recommend/batch", {"sessions": ["sku1"]}, "sessions"),
        ("/v1/recommend/batch", {"sessions": [["sku1"] * 6]}, "sessions"),
        ("/v1/session-focus", {"items": 5}, "items"),
    ],
)
def test_bad_bodies_get_422_naming_the_field(small, path, body, field):
    if isinstance(body, bytes):
        r = httpx.post(small.url + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(small.url + path, json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail[0]["msg"]
    if field:
        assert any(field in d["loc"] for d in detail), detail


@pytest.mark.parametrize(
    "body",
    [
        b'{"items": [' + b"[" * 50_000 + b"]" * 50_000 + b"]}",  # nested beyond the JSON parser's recursion limit
        b'{"items": [' + b"1" * 5000 + b"]}",  # beyond Python's limit on int digits
        b'{"items": [1e400]}',  # Infinity: the error cannot echo it back as JSON
        b'{"items": [NaN]}',
        b'{"items": [1], "temperature": Infinity}',
        b'{"items": ["\\ud800"]}',  # a lone surrogate cannot be encoded as UTF-8 in the answer
        b'{"items": ["a"], "exclude": ["\\udfff"]}',
        b"\xff\xfe",
    ],
)
def test_hostile_bodies_get_4xx_never_5xx(server, body):
    r = httpx.post(f"{server.url}/v1/recommend", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text[:300]
    assert r.json()["detail"]


def test_limits_wrong_methods_and_body_size(small):
    big = {"items": ["sku1"], "exclude": ["y" * 10] * 200}
    r = httpx.post(f"{small.url}/v1/recommend", json=big)
    assert r.status_code == 413 and "2000 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: chunked transfer encoding
        for _ in range(50):
            yield b" " * 100

    r = httpx.post(f"{small.url}/v1/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(f"{small.url}/v1/recommend").status_code == 405
    assert httpx.get(f"{small.url}/nothing").status_code == 404
    ok = httpx.post(f"{small.url}/v1/recommend", json={"items": ["sku1"] * 5, "k": 7, "exclude": ["a"] * 4})
    assert ok.status_code == 200 and len(ok.json()["items"]) == 7
    text = httpx.get(f"{small.url}/metrics").text
    assert metric_value(text, "sasrec_requests_total", path="/v1/recommend", method="POST", status="413") == 2
    assert metric_value(text, "sasrec_requests_total", path="other", method="GET", status="404") == 1
    assert not samples(text, "sasrec_requests_total", status="500")


def test_admin_token(small, other_bundle):
    assert httpx.post(f"{small.url}/admin/reload").status_code == 403
    assert httpx.post(f"{small.url}/admin/reload", headers={"x-admin-token": "wrong"}).status_code == 403
    r = httpx.post(f"{small.url}/admin/reload", headers={"x-admin-token": "s3cret"})
    assert r.status_code == 200 and r.json()["model"] == r.json()["previous"]


def test_reload_under_concurrent_requests_fails_nothing(server, bundle, other_bundle, tmp_path):
    """Four clients send requests without pause while the model is reloaded 6 times (then once more, from a
    bundle that does not exist): no request fails, and after each reload the clients get the new model. Progress is
    counted, never timed: each step waits for a number of answers, so a slow machine only makes the test slower."""
    sha = {Predictor.load(b).sha: b for b in (bundle, other_bundle)}
    assert len(sha) == 2
    answers = threading.Condition()
    statuses, models, errors, stop = [], [], [], threading.Event()

    def client():
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/recommend", json={"items": ["sku3", "sku4"], "k": 5})
                except httpx.HTTPError as e:
                    r = e
                with answers:
                    if isinstance(r, Exception):
                        errors.append(repr(r))
                    else:
                        statuses.append(r.status_code)
                        models.append(r.json()["model"] if r.status_code == 200 else None)
                    answers.notify_all()

    def await_answers(n: int, model: str | None = None) -> None:
        """Waits until n more answers arrive (from `model`, if given), counted from now."""
        with answers:
            start = len(models)
            got = lambda: len(models) - start if model is None else models[start:].count(model)  # noqa: E731
            assert answers.wait_for(lambda: got() >= n or errors, timeout=120), "the clients stopped answering"

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    reloads = []
    try:
        await_answers(8)  # every reload below happens while the clients are running
        for i in range(6):
            target = other_bundle if i % 2 == 0 else bundle
            r = httpx.post(f"{server.url}/admin/reload", json={"bundle": str(target)}, headers=ADMIN, timeout=30)
            reloads.append(r.status_code)
            await_answers(5, r.json()["model"] if r.status_code == 200 else None)
        missing = {"bundle": str(tmp_path / "missing")}
        bad = httpx.post(f"{server.url}/admin/reload", json=missing, headers=ADMIN, timeout=30)
        await_answers(5, Predictor.load(bundle).sha)  # the failed reload changed nothing
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors and reloads == [200] * 6
    assert bad.status_code == 422 and "still serving" in bad.json()["detail"]
    assert len(statuses) >= 8 + 6 * 5 + 5 and set(statuses) == {200}, f"{len(statuses)} requests: {set(statuses)}"
    assert set(models) == set(sha)
    info = httpx.get(f"{server.url}/v1/model").json()
    assert info["model"] == Predictor.load(bundle).sha and info["bundle"] == bundle.name  # the last good reload
    text = httpx.get(f"{server.url}/metrics").text
    assert {s.labels["result"]: s.value for s in samples(text, "sasrec_reloads_total")} == {
        "ok": 6, "error": 1, "busy": 0}  # fmt: skip
    # one model at a time: the one served now, not one line per model ever served
    assert [(s.labels, s.value) for s in samples(text, "sasrec_model_info")] == [({"model": info["model"]}, 1)]


def test_python_m_serve_binds_loopback_and_reloads_on_sighup(bundle):
    assert build_parser().parse_args(["b"]).host == "127.0.0.1"
    assert cli.build_parser().parse_args(["serve", "b"]).host == "127.0.0.1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sasrec_serve", str(bundle), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, proc)
        assert httpx.post(f"{url}/v1/recommend", json={"items": ["sku1"], "k": 2}).status_code == 200
        proc.send_signal(signal.SIGHUP)
        reloaded = lambda: metric_value(httpx.get(f"{url}/metrics").text, "sasrec_reloads_total", result="ok") == 1  # noqa: E731
        _wait_for(reloaded, proc)
        assert httpx.get(f"{url}/readyz").status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught
    assert proc.returncode in (0, -signal.SIGTERM), out[-2000:]
    assert "Application shutdown complete" in out and "Traceback" not in out
    assert out.count("serving ") == 2  # the start, then the reload


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _per_worker(metrics_dir: Path, name: str, **labels) -> dict[int, float]:
    """{worker pid: its own count} from the files prometheus_client's multiprocess mode keeps per process, read
    with the library's own merge: which worker answered which request, which no answer says."""
    return {
        int(f.stem.split("_")[1]): sum(s.value for m in MultiProcessCollector.merge([str(f)]) for s in m.samples
                                       if s.name == name and labels.items() <= s.labels.items())
        for f in metrics_dir.glob("counter_*.db")
    }  # fmt: skip


def test_metrics_count_the_requests_of_every_worker(bundle, tmp_path):
    """`--workers 2`: the two processes share their metrics (prometheus_client's multiprocess mode in a private
    directory the server makes and removes), so every scrape, whichever worker answers it, counts every request
    sent, also those of a worker that was killed since; the model gauge is 1, not one per worker."""
    tmp = tmp_path / "tmp"  # the server's TMPDIR, where its private metrics directory appears
    tmp.mkdir()
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sasrec_serve", str(bundle), "--port", str(port), "--workers", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    sha = Predictor.load(bundle).sha

    def recommend(_):
        # a new connection each time (httpx.post), so the kernel may hand it to either worker
        return httpx.post(f"{url}/v1/recommend", json={"items": ["sku1"], "k": 2}, timeout=30).status_code

    def scrape(_):
        return httpx.get(f"{url}/metrics", timeout=30).text

    try:
        _wait_for(lambda: len(list(tmp.glob("sasrec-serve-metrics-*/counter_*.db"))) == 2, proc)  # both started
        [metrics_dir] = tmp.glob("sasrec-serve-metrics-*")
        _wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, proc)
        sent = 0
        with ThreadPoolExecutor(8) as pool:
            # concurrent requests until both workers have answered some (count-based: at most 50 rounds)
            for _ in range(50):
                assert set(pool.map(recommend, range(16))) == {200}
                sent += 16
                served = _per_worker(metrics_dir, "sasrec_requests_total", path="/v1/recommend")
                if len(served) == 2 and min(served.values()) > 0:
                    break
            else:
                pytest.fail(f"one worker answered all {sent} requests: {served}")
            assert sum(served.values()) == sent
            # scrapes until each worker has answered some: every one counts every request sent
            for _ in range(50):
                for text in pool.map(scrape, range(8)):
                    assert metric_value(text, "sasrec_requests_total", path="/v1/recommend") == sent
                    assert metric_value(text, "sasrec_request_seconds_count", path="/v1/recommend") == sent
                    assert [(s.labels, s.value) for s in samples(text, "sasrec_model_info")] == [({"model": sha}, 1)]
                scraped = _per_worker(metrics_dir, "sasrec_requests_total", path="/metrics")
                if len(scraped) == 2 and min(scraped.values()) > 0:
                    break
            else:
                pytest.fail(f"one worker answered every scrape: {scraped}")

        # a worker killed outright (it never shuts down): uvicorn starts another; the killed one's requests still
        # count (counters never go back) and its live gauge is dropped at the next scrape
        victim = next(iter(served))
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: len(list(metrics_dir.glob("counter_*.db"))) == 3, proc)  # the replacement started
        _wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, proc)
        text = scrape(0)
        assert not (metrics_dir / f"gauge_livemax_{victim}.db").exists()
        assert metric_value(text, "sasrec_requests_total", path="/v1/recommend") == sent
        assert [(s.labels, s.value) for s in samples(text, "sasrec_model_info")] == [({"model": sha}, 1)]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not list(tmp.glob("sasrec-serve-metrics-*"))  # removed at exit


def test_cli_refuses_a_missing_bundle_and_bad_options(bundle, tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path / "nothing")]) == 2
    assert "nothing: no such directory" in capsys.readouterr().err
    assert cli.main(["serve", str(bundle), "--workers", "0"]) == 2
    assert "--workers and --threads must be at least 1" in capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, "-m", "sasrec_serve", str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert (
        proc.returncode == 2
        and proc.stderr == f"error: {tmp_path}: no manifest.json: not a sasrec-jax bundle directory\n"
    )


def _wait_for(condition, proc, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_a_graph_that_cannot_be_loaded_on_first_use_gets_503(bundle, tmp_path):
    """Graphs load on first use (the scores graphs of shortlist bundles): if the file has gone since the bundle
    was verified, the request gets a 503 naming the graph, not a 500, and the service keeps answering."""
    copy = derive_bundle(bundle, tmp_path / "b")
    app = create_app(copy)
    with Server(app) as s, httpx.Client(base_url=s.url) as c:
        p = app.state.model.predictor
        p._models[-1] = None  # as a shortlist bundle's predictor leaves model.onnx until a call needs it
        (copy / "model.onnx").unlink()
        r = c.post("/v1/recommend", json={"items": ["sku3"], "k": 3})
        assert r.status_code == 503 and "model.onnx" in r.json()["detail"], r.text
        assert str(copy) not in r.text  # onnxruntime's message names the file's host path: not passed on
        assert c.get("/healthz").status_code == 200


def test_responses_are_json_with_no_nan(server):
    r = httpx.post(f"{server.url}/v1/recommend", json={"items": ["sku2"], "k": 50, "normalize": True})
    body = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in the response"))  # not valid JSON
    assert len(body["items"]) == 19 and sum(body["scores"]) == pytest.approx(1.0)
