"""The serving side's defences, one test (or more) per defect of the audit: admin off by default, reloads confined
to the bundle root and one at a time, no host paths or file contents in answers, manifest schema, non-finite
weights and scores, 5xx from hostile input, HTTP timeouts and limits, and a bounded HTTP fuzz."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx", reason="building the test bundle needs the export extra")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import anyio.from_thread  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from sasrec_serve import BundleError, Predictor, check_bundle, session_focus  # noqa: E402
from sasrec_serve import bundle as B  # noqa: E402
from sasrec_serve import cli as serve_cli  # noqa: E402
from sasrec_serve.app import Timeouts, create_app, server_options  # noqa: E402

from sasrec_jax import cli as sasrec_cli  # noqa: E402
from tests.serve_bundles import derive_bundle, tiny_bundle  # noqa: E402
from tests.test_serve_http import Server, metric_value  # noqa: E402

TOKEN = "hardening-token-0123456789"
ADMIN = {"x-admin-token": TOKEN}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def root(bundle, tmp_path_factory) -> Path:
    """A bundle root: `served` (the bundle), `other` (the same model under another manifest), `empty` (a
    directory without manifest) and `escape` (a symlink to a bundle outside the root)."""
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(bundle, root / "served")
    derive_bundle(bundle, root / "other", manifest={"created": "another day"})
    (root / "empty").mkdir()
    outside = derive_bundle(bundle, tmp_path_factory.mktemp("outside") / "bundle", manifest={"created": "outside"})
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root


@contextlib.contextmanager
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def edit_manifest(src: Path, dst: Path, **changes) -> Path:
    """A copy of `src` whose manifest.json has `changes` (a value None deletes the key); checksums untouched."""
    shutil.copytree(src, dst)
    m = json.loads((dst / B.MANIFEST).read_text())
    for key, value in changes.items():
        if value is None:
            m.pop(key, None)
        else:
            m[key] = value
    (dst / B.MANIFEST).write_text(json.dumps(m))
    return dst


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- 1. admin off by default, reloads confined to the bundle root, no host paths, one reload at a time --------


def test_admin_endpoints_and_docs_are_absent_by_default(root):
    with client(create_app(root / "served")) as c:
        for body in (None, {"bundle": "other"}, {"bundle": "/etc"}):
            r = c.post("/admin/reload", json=body, headers=ADMIN)
            assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 404
        assert c.get("/readyz").status_code == 200
    with client(create_app(root / "served", docs=True)) as c:
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200


def test_reload_loads_only_bundles_under_the_root(root, bundle):
    app = create_app(root / "served", admin_token=TOKEN)  # the root: the served bundle's parent
    other_sha = Predictor.load(root / "other").sha
    with client(app) as c:
        outside = root / "escape"  # a symlink under the root to a bundle outside it
        for name in (str(outside.resolve()), "escape", "../" + outside.resolve().parent.name, "/etc", str(bundle)):
            r = c.post("/admin/reload", json={"bundle": name}, headers=ADMIN)
            assert r.status_code == 403, (name, r.text)
            assert r.json()["detail"] == "bundle must name a directory under the server's bundle root"
        # a missing directory and one without a manifest answer alike: the request learns nothing more
        missing = c.post("/admin/reload", json={"bundle": "missing"}, headers=ADMIN)
        empty = c.post("/admin/reload", json={"bundle": "empty"}, headers=ADMIN)
        assert missing.status_code == empty.status_code == 422 and missing.json() == empty.json()
        assert "no manifest.json" in missing.json()["detail"] and str(root) not in missing.text
        r = c.post("/admin/reload", json={"bundle": "other"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["model"] == other_sha and r.json()["bundle"] == "other"
        r = c.post("/admin/reload", json={"bundle": str(root / "served")}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["bundle"] == "served"
        assert c.get("/v1/model").json()["bundle"] == "served"


def test_a_bundle_root_can_be_set(root, bundle, tmp_path_factory):
    app = create_app(root / "served", admin_token=TOKEN, bundle_root=bundle.parent)
    with client(app) as c:
        assert c.post("/admin/reload", json={"bundle": str(root / "other")}, headers=ADMIN).status_code == 403
        r = c.post("/admin/reload", json={"bundle": bundle.name}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["bundle"] == bundle.name


def test_manifest_entries_cannot_reach_outside_the_bundle(bundle, tmp_path, capsys):
    """A manifest listing '/etc/…' or '../' paths (with the right checksums, as a tamperer would write them) is
    refused before the file is opened, and nothing of that file comes back in an answer."""
    secret = tmp_path / "secret.txt"
    secret.write_text("root:$6$hash")
    digest = B.sha256_file(secret)
    files = json.loads((bundle / B.MANIFEST).read_text())["files"]
    base = tmp_path / "root"
    base.mkdir()
    for i, name in enumerate([str(secret), f"../{secret.name}", "sub/../../secret.txt", "x\\..\\secret.txt", "a\0b"]):
        bad = edit_manifest(bundle, base / f"b{i}", files={**files, name: {"sha256": digest}})
        with pytest.raises(BundleError, match="not a plain file name inside the bundle"):
            Predictor.load(bad)
    link = derive_bundle(bundle, base / "link")
    (link / "extra.txt").symlink_to(secret)
    m = json.loads((link / B.MANIFEST).read_text())
    m["files"]["extra.txt"] = {"sha256": digest}
    (link / B.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="extra.txt is a link to a file outside the bundle"):
        Predictor.load(link)
    # over HTTP: a wrong checksum for an outside file used to be answered with that file's checksum
    wrong = edit_manifest(bundle, base / "wrong", files={**files, str(secret): {"sha256": "0" * 64}})
    with client(create_app(bundle, admin_token=TOKEN, bundle_root=base)) as c:
        for target in (wrong, base / "b0", link):
            r = c.post("/admin/reload", json={"bundle": target.name}, headers=ADMIN)
            assert r.status_code == 422, r.text
            assert digest[:16] not in r.text and str(tmp_path) not in r.text and "root:" not in r.text


def test_model_info_shows_no_host_path(root):
    served = root / "served"
    with client(create_app(served)) as c:
        r = c.get("/v1/model")
    info = r.json()
    assert r.status_code == 200 and str(root) not in r.text and "bundle_dir" not in info
    assert info["bundle"] == "served"
    assert info["manifest_sha256"] == hashlib.sha256((served / B.MANIFEST).read_bytes()).hexdigest()
    assert info["model"] == info["manifest_sha256"][:16] and info["manifest"]["num_items"] == 20


def test_reloads_run_one_at_a_time_and_a_concurrent_one_gets_409_at_once(root):
    app = create_app(root / "served", admin_token=TOKEN)
    with Server(app) as s, httpx.Client(base_url=s.url, headers=ADMIN, timeout=10) as c:
        lock = app.state.model._reload_lock
        assert lock.acquire(timeout=5)  # as a reload in progress holds it
        try:
            r = c.post("/admin/reload")  # would wait for the lock (a thread of the pool held) before the fix
            assert r.status_code == 409 and "another reload is running" in r.json()["detail"]
            assert c.post("/v1/recommend", json={"items": ["sku3"], "k": 3}).status_code == 200
        finally:
            lock.release()
        assert c.post("/admin/reload").status_code == 200
        statuses, recs = [], []

        def reload_once():
            statuses.append(c.post("/admin/reload", json={"bundle": "other"}).status_code)

        threads = [threading.Thread(target=reload_once) for _ in range(8)]
        for t in threads:
            t.start()
        for _ in range(10):
            recs.append(c.post("/v1/recommend", json={"items": ["sku3"], "k": 3}).status_code)
        for t in threads:
            t.join(30)
        assert set(statuses) <= {200, 409} and 200 in statuses and len(statuses) == 8 and set(recs) == {200}
        text = c.get("/metrics").text
        assert metric_value(text, "sasrec_reloads_total", result="busy") == 1 + statuses.count(409)


# -- 2. non-finite weights and scores --------------------------------------------------------------------


def nan_initializer(bundle: Path, dst: Path, graph: str) -> Path:
    """A copy of `bundle` with one weight of `graph` (not the shared item table) set to NaN, checksums updated."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    edited = dst.with_name(dst.name + "-edited")
    shutil.copytree(bundle, edited)
    table = json.loads((bundle / B.MANIFEST).read_text())["item_table"]["initializer"]
    model = onnx.load(str(edited / graph))
    init = next(i for i in model.graph.initializer if i.name != table and i.data_type == onnx.TensorProto.FLOAT)
    init.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), np.nan), init.name))
    onnx.save(model, str(edited / graph))
    return derive_bundle(edited, dst)


def test_nan_weights_fail_check_and_load(bundle, tmp_path, capsys):
    table = np.load(bundle / B.ITEM_EMBEDDINGS)
    table[5, 3] = np.nan
    nan_table = derive_bundle(bundle, tmp_path / "table", embeddings=table)
    for load in (check_bundle, Predictor.load):
        with pytest.raises(BundleError, match="item_embeddings.npy holds NaN or infinite values"):
            load(nan_table)
    assert sasrec_cli.main(["export", "--check", str(nan_table)]) == 2
    assert "item_embeddings.npy holds NaN" in one_line_error(capsys)
    nan_model = nan_initializer(bundle, tmp_path / "model", B.MODEL)
    for load in (check_bundle, Predictor.load):
        with pytest.raises(BundleError, match="model.onnx gives non-finite outputs"):
            load(nan_model)
    # the encoder loads on first use in the predictor, so --check loads it too
    nan_encoder = nan_initializer(bundle, tmp_path / "encoder", B.ENCODER)
    with pytest.raises(BundleError, match="encoder.onnx gives non-finite outputs"):
        check_bundle(nan_encoder)
    assert serve_cli.main([str(nan_model)]) == 2
    assert "model.onnx gives non-finite outputs" in one_line_error(capsys)


def test_non_finite_scores_are_never_recommended(bundle):
    app = create_app(bundle)
    with client(app) as c:
        p = app.state.model.predictor
        real = p._scores

        def some_nan(seq):
            s = real(seq).copy()
            s[:, p.vocab.indices(["sku4", "sku5"])] = [np.nan, np.inf]
            return s

        p._scores = some_nan
        r = c.post("/v1/recommend", json={"items": ["sku3"], "k": 30, "normalize": True})
        body = json.loads(r.text, parse_constant=lambda x: pytest.fail(f"{x} in the answer"))
        assert r.status_code == 200 and len(body["items"]) == 17 and not {"sku4", "sku5"} & set(body["items"])
        assert all(math.isfinite(s) for s in body["scores"]) and sum(body["scores"]) == pytest.approx(1.0)
        p._scores = lambda seq: np.full_like(real(seq), np.nan)
        for path, body in (("/v1/recommend", {"items": ["sku3"]}), ("/v1/recommend/batch", {"sessions": [["sku3"]]})):
            r = c.post(path, json=body)
            assert r.status_code == 503 and "no finite score" in r.json()["detail"], r.text
        assert c.post("/v1/recommend", json={"items": []}).status_code == 200  # the fallback needs no scores
        with pytest.raises(BundleError, match="non-finite scores"):
            p.score_items([["sku3"]])


def test_session_focus_is_never_a_silent_zero(bundle):
    app = create_app(bundle)
    with client(app) as c:
        p = app.state.model.predictor
        p.item_embeddings = np.full_like(np.asarray(p.item_embeddings), np.nan)  # as broken weights would be
        with pytest.raises(BundleError, match="non-finite focus"):
            session_focus(p, ["sku1", "sku2"])
        r = c.post("/v1/session-focus", json={"items": ["sku1", "sku2"]})
        assert r.status_code == 503 and "non-finite focus" in r.json()["detail"]


def test_model_info_never_fails_on_nan_in_the_manifest(bundle, tmp_path):
    nan = derive_bundle(bundle, tmp_path / "nan", manifest={"parity": {"max_abs_diff": float("nan")}})
    assert "NaN" in (nan / B.MANIFEST).read_text()  # Python's json writes it
    with client(create_app(nan)) as c:
        r = c.get("/v1/model")
    assert r.status_code == 200 and r.json()["manifest"]["parity"] == {"max_abs_diff": None}


# -- 5. / 6. malformed manifests and hostile input: 4xx and one-line errors, never 5xx or a traceback ---------


MALFORMED = {
    "files-list": {"files": list(B.REQUIRED)},  # every required name "listed": the old check passed it on
    "files-string": {"files": " ".join(B.REQUIRED)},
    "no-max-len": {"max_len": None},
    "windows-strings": {"windows": ["x"]},
    "max-len-float": {"max_len": 8.0},
    "num-items-bool": {"num_items": True},
    "dim-negative": {"dim": -16},
    "format-string": {"format_version": "1"},
    "sha-short": {"files": {"model.onnx": {"sha256": "abc"}}},
    "shortlist-string": {"shortlist": "yes"},
    "item-table-unlisted": {"item_table": {"initializer": "const_0", "graphs": ["elsewhere.onnx"]}},
    "window-unlisted": {"windows": [4]},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifests_are_one_line_errors(bundle, tmp_path, capsys, case):
    bad = edit_manifest(bundle, tmp_path / case, **MALFORMED[case])
    with pytest.raises(BundleError, match=r"^manifest\.json: \S+ "):
        B.read_manifest(bad)
    assert sasrec_cli.main(["export", "--check", str(bad)]) == 2
    assert one_line_error(capsys).startswith("error: manifest.json: ")
    assert serve_cli.main([str(bad)]) == 2  # = sasrec-jax serve: refused before uvicorn starts
    assert one_line_error(capsys).startswith(f"error: {bad}: manifest.json: ")
    assert sasrec_cli.main(["serve", str(bad)]) == 2
    one_line_error(capsys)


def test_reload_of_a_malformed_manifest_gets_422(bundle, tmp_path):
    base = tmp_path / "root"
    base.mkdir()
    for case in ("files-list", "files-string"):
        edit_manifest(bundle, base / case, **MALFORMED[case])
    with client(create_app(bundle, admin_token=TOKEN, bundle_root=base)) as c:
        for case in ("files-list", "files-string"):
            r = c.post("/admin/reload", json={"bundle": str(base / case)}, headers=ADMIN)
            assert r.status_code == 422 and "manifest.json: files must be an object" in r.json()["detail"], r.text


def test_hostile_reload_bodies_and_tokens_get_4xx(root):
    app = create_app(root / "served", admin_token="tökén-0123456789-ünïcode")
    with client(app) as c:
        for body in (b'{"bundle": "\\ud800"}', b'{"bundle": "a\\u0000b"}', b'{"bundle": 5}', b'{"bundle": ""}',
                     b'{"x": 1}', b"[", b"\xff"):  # fmt: skip
            headers = {"x-admin-token": "tökén-0123456789-ünïcode".encode(), "content-type": "application/json"}
            r = c.post("/admin/reload", content=body, headers=headers)
            assert r.status_code in (403, 422), (body, r.status_code, r.text)
        for token in ("tökén".encode("latin-1"), "tökén".encode(), b"\xff\xfe\x00", b"", b"x" * 10_000):
            r = c.post("/admin/reload", headers={"x-admin-token": token})
            assert r.status_code == 403, (token, r.text)
        r = c.post("/admin/reload", headers=[("x-admin-token", b"a"), ("x-admin-token", b"b")])
        assert r.status_code == 403
        # the token is compared as UTF-8 bytes: a non-ASCII token works when sent as UTF-8
        ok = c.post("/admin/reload", headers={"x-admin-token": "tökén-0123456789-ünïcode".encode()})
        assert ok.status_code == 200, ok.text
    with pytest.raises(ValueError, match="UTF-8"):
        create_app(root / "served", admin_token="\ud800")


# -- 9. --check validates what the predictor needs; HTTP timeouts and limits ---------------------------------


@pytest.mark.parametrize(
    "items, message",
    [(["a", "b"], "items.json has 2 ids, the manifest says 20"), ([], "items.json"), ({"a": 1}, "items.json")],
)
def test_check_refuses_the_items_the_predictor_refuses(bundle, tmp_path, items, message):
    bad = derive_bundle(bundle, tmp_path / "bad", items=items)
    with pytest.raises(BundleError, match=message):
        Predictor.load(bad)
    with pytest.raises(BundleError, match=message):
        check_bundle(bad)


def read_until_closed(sock: socket.socket, seconds: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after `seconds`."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {seconds} s; got {data[:200]!r}") from None
    except ConnectionResetError:
        pass
    return data


def test_header_body_and_idle_timeouts_close_slow_connections(bundle):
    timeouts = Timeouts(header=0.5, body=0.5, keep_alive=0.5)
    with Server(create_app(bundle, timeouts=timeouts), **server_options(timeouts)) as s:
        with socket.create_connection(s.address) as c:  # connects, sends nothing
            assert read_until_closed(c) == b""
        with socket.create_connection(s.address) as c:  # half-sent headers
            c.sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\n")
            assert read_until_closed(c) == b""
        with socket.create_connection(s.address) as c:  # headers trickled a byte at a time keep no timer away
            closed = False
            for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 200:
                try:
                    c.send(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.05)  # 200 bytes: 10 s of trickle, 20 times the header timeout
            assert closed or read_until_closed(c, 1.0) == b""
        with socket.create_connection(s.address) as c:  # complete headers, a body that never ends
            c.sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"items\"")  # fmt: skip
            answer = read_until_closed(c)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"request body not received within 0.5 s" in answer
        with socket.create_connection(s.address) as c:  # a prompt request is answered, then the idle one closed
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_until_closed(c)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status":"ok"}')
        assert httpx.get(f"{s.url}/readyz").status_code == 200


def test_concurrency_limit_answers_503(bundle):
    with Server(create_app(bundle), **server_options(limit_concurrency=2)) as s:
        with socket.create_connection(s.address), socket.create_connection(s.address):
            time.sleep(0.2)  # both connections accepted (not a timing assertion: the answer below is)
            r = httpx.get(f"{s.url}/healthz")
            assert r.status_code == 503
        deadline = time.monotonic() + 10
        while httpx.get(f"{s.url}/healthz").status_code != 200:
            assert time.monotonic() < deadline, "503 after the idle connections closed"
            time.sleep(0.1)


# -- the command line ---------------------------------------------------------------------------------------


def test_sasrec_jax_serve_has_the_flags_of_python_m_serve():
    def flags(parser):
        return sorted((tuple(a.option_strings), a.dest, a.default, a.type, a.help) for a in parser._actions)

    sub = next(a for a in sasrec_cli.build_parser()._actions if a.dest == "command").choices["serve"]
    assert flags(sub) == flags(serve_cli.build_parser())
    options = {o for a in serve_cli.build_parser()._actions for o in a.option_strings}
    assert {"--bundle-root", "--docs", "--header-timeout", "--body-timeout", "--keep-alive-timeout",
            "--limit-concurrency", "--admin-token"} <= options  # fmt: skip


@pytest.fixture
def fake_uvicorn(monkeypatch):
    """sasrec_serve.cli.run up to uvicorn.run, which records its arguments; the environment it sets is restored."""
    from sasrec_serve import app as service

    for name in (service.ENV_BUNDLE, service.ENV_THREADS, service.ENV_ADMIN_TOKEN, service.ENV_BUNDLE_ROOT,
                 service.ENV_DOCS, service.ENV_BODY_TIMEOUT):  # fmt: skip
        monkeypatch.setenv(name, "")
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: calls.append(kw))
    return calls


def test_cli_defaults_warnings_and_refusals(bundle, tmp_path, fake_uvicorn, capsys):
    import os

    from sasrec_serve import app as service

    assert serve_cli.main([str(bundle), "--host", "0.0.0.0"]) == 0
    assert capsys.readouterr().err == ""  # no admin endpoint: nothing to warn about
    kw = fake_uvicorn[-1]
    assert kw["limit_concurrency"] == 256 and kw["timeout_keep_alive"] == 5.0 and kw["ws"] == "none"
    assert kw["http"].keywords == {"header_timeout": 10.0}
    assert os.environ[service.ENV_BUNDLE_ROOT] == str(bundle.resolve().parent)
    assert os.environ[service.ENV_BODY_TIMEOUT] == "30.0" and os.environ[service.ENV_DOCS] == ""
    assert serve_cli.main([str(bundle), "--host", "0.0.0.0", "--admin-token", TOKEN, "--docs"]) == 0
    assert "clear text" in capsys.readouterr().err and os.environ[service.ENV_DOCS] == "1"
    for argv, message in [
        (["--admin-token", "short"], "at least 16 characters"),
        (["--header-timeout", "0"], "positive numbers of seconds"),
        (["--body-timeout", "nan"], "positive numbers of seconds"),
        (["--limit-concurrency", "0"], "--limit-concurrency must be at least 1"),
        (["--bundle-root", str(tmp_path / "none")], "no such directory"),
    ]:
        assert serve_cli.main([str(bundle), *argv]) == 2
        assert message in one_line_error(capsys)
    assert len(fake_uvicorn) == 2


# -- a bounded fuzz of every endpoint ------------------------------------------------------------------------

ROUTES = [("POST", "/v1/recommend"), ("POST", "/v1/recommend/batch"), ("POST", "/v1/session-focus"),
          ("GET", "/v1/model"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
          ("POST", "/admin/reload")]  # fmt: skip
METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "BREW"]
ODD_PATHS = ["/admin/reload/", "//v1/model", "/v1/recommend?k=3", "/%2e%2e/etc/passwd", "/v1/%00", "/docs",
             "/openapi.json", "/v1/model/.."]  # fmt: skip
PRINTABLE = st.text(st.characters(codec="utf-8", exclude_categories=("C", "Z")), max_size=20)
FIELDS = ["items", "sessions", "k", "exclude", "exclude_seen", "temperature", "seed", "normalize", "bundle"]
ANY_CHAR = st.characters(codec=None, exclude_categories=())  # lone surrogates too
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-(10**400), 10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(ANY_CHAR, max_size=12)
    | st.sampled_from(["sku1", "sku3", "20", "NaN", "Infinity", "-0", "../served", "/etc/passwd", "other", "a\0b"])
)
JSON = st.recursive(
    SCALARS,
    lambda c: st.lists(c, max_size=6) | st.dictionaries(st.sampled_from(FIELDS) | st.text(ANY_CHAR, max_size=6), c,
                                                        max_size=6),
    max_leaves=20,
)  # fmt: skip
IDS = st.sampled_from(["sku1", "sku2", "sku3", "sku20", "zz", 3, "3", 3.0]) | SCALARS
PLAUSIBLE = st.fixed_dictionaries(
    {"items": st.lists(IDS, max_size=10)},
    optional={
        "k": st.integers(-2, 1200) | SCALARS,
        "exclude": st.lists(IDS, max_size=5),
        "exclude_seen": st.booleans() | SCALARS,
        "temperature": st.floats(0, 5) | SCALARS,
        "seed": st.integers(-1, 2**64) | st.none(),
        "normalize": st.booleans(),
        "sessions": st.lists(st.lists(IDS, max_size=6), max_size=5),
        "bundle": st.sampled_from(["other", "served", "escape", "empty", "../served", "missing"]) | SCALARS,
    },
)
BODIES = st.one_of(
    PLAUSIBLE.map(lambda d: json.dumps(d).encode()),
    PLAUSIBLE.map(lambda d: json.dumps({k: v for k, v in d.items() if k not in ("items", "bundle")}).encode()),
    st.fixed_dictionaries({}, optional={f: JSON for f in FIELDS}).map(lambda d: json.dumps(d).encode()),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.integers(1, 20_000).map(lambda n: b'{"items": ' + b"[" * n + b"]" * n + b"}"),
    st.just(b'{"items": [' + b"1" * 5000 + b"]}"),
    st.just(b'{"items": ["sku1"], "temperature": NaN, "k": 1e400}'),
    st.just(b""),
)
HEADER_VALUES = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b) | st.sampled_from(
    [TOKEN.encode(), b"application/json", "tökén".encode("latin-1"), "tökén".encode()]
)
REQUEST_LINES = st.one_of(
    st.sampled_from(ROUTES),
    st.sampled_from(ROUTES),
    st.sampled_from(ROUTES),
    st.tuples(
        st.sampled_from(METHODS),
        st.sampled_from([r for _, r in ROUTES] + ODD_PATHS) | PRINTABLE.map(lambda t: "/" + t.lstrip("/")),
    ),
)


@contextlib.contextmanager
def asgi_requests(app):
    """`request(method, url, **kw)` through httpx's ASGI transport after the app's lifespan; each request must
    finish within 20 s (anyio.fail_after), so a hang fails the test instead of stalling it."""
    with anyio.from_thread.start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(app.router.lifespan_context(app)):
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

            def request(method: str, url: str, **kw) -> httpx.Response:
                async def send():
                    with anyio.fail_after(20):
                        return await http.request(method, url, **kw)

                return portal.call(send)

            try:
                yield request
            finally:
                portal.call(http.aclose)


@pytest.mark.slow  # 2,500 requests (~11 s): the full suite runs it
def test_http_fuzz_never_answers_5xx(root, tmp_path_factory):
    app = create_app(root / "served", admin_token=TOKEN)
    seen: dict[int, int] = {}
    base = str(tmp_path_factory.getbasetemp())

    with asgi_requests(app) as request:

        @settings(max_examples=2500, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(
            line=REQUEST_LINES,
            body=BODIES,
            token=st.one_of(st.just(TOKEN.encode()), st.just(TOKEN.encode()), st.none(), HEADER_VALUES),
            content_type=st.one_of(st.none(), st.none(), st.just(b"application/json"), HEADER_VALUES),
            extra=st.dictionaries(st.from_regex(r"x-[a-z]{1,8}", fullmatch=True), HEADER_VALUES, max_size=3),
        )
        def one_request(line, body, token, content_type, extra):
            method, path = line
            headers = dict(extra)
            if token is not None:
                headers["x-admin-token"] = token
            if content_type is not None:
                headers["content-type"] = content_type
            r = request(method, path, content=body, headers=headers)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (method, path, body[:200], r.status_code, r.text[:300])
            assert base not in r.text  # no host path in any answer
            if r.headers.get("content-type", "").startswith("application/json") and method != "HEAD":
                json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in an answer"))

        one_request()
    assert sum(seen.values()) == 2500 and {200, 403, 404, 405, 422} <= set(seen), seen
