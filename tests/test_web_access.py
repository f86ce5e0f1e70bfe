"""Access rules and error answers of the web app (Starlette's test client over a real job
store and worklist on disk): open on loopback without users, sign-in otherwise, lock-out,
idle time-out, CSRF, oversized bodies, unknown studies, the proxy header allow-list."""

from __future__ import annotations

import re
import time
from pathlib import Path

from starlette.testclient import TestClient

from cxr_ai.store.jobs import JobStore
from cxr_ai.store.spool import Spool
from cxr_ai.service.web.app import MSG_UNKNOWN_STUDY, WebContext, create_app
from cxr_ai.service.web.auth import UserStore
from cxr_ai.service.web.settings import WebSettings
from cxr_ai.worklist import Worklist

PASSWORD = "a long enough password"


def make(tmp: Path, *, host: str = "127.0.0.1", users: bool = False, **kw) -> tuple[TestClient, WebContext]:
    settings = WebSettings(enabled=True, host=host, users_file=tmp / "users.toml", secret_file=tmp / "secret",
                           audit_log=tmp / "audit.jsonl", feedback_db=tmp / "fb.sqlite3", **kw)
    if users:
        UserStore(settings.users_file).add("drwho", password=PASSWORD)
    ctx = WebContext(settings=settings, store=JobStore(tmp / "jobs.sqlite3"), spool=Spool(tmp / "spool"),
                     worklist=Worklist(tmp / "wl.sqlite3"), truth=None, pseudonym_key=b"k" * 32,
                     health=lambda: {"status": "ok"}, status=lambda: {}, metrics=lambda: b"")
    ctx.rows.min_interval = 0.0  # every change shows at once (the 3 s floor is for live pages)
    return TestClient(create_app(ctx), follow_redirects=False), ctx


def csrf(client: TestClient, path: str = "/signin") -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text).group(1)


def sign_in(client: TestClient, password: str = PASSWORD):
    return client.post("/signin", data={"name": "drwho", "password": password, "csrf_token": csrf(client)})


def test_open_on_loopback_without_users_closed_otherwise(tmp_path: Path) -> None:
    client, _ = make(tmp_path / "a")
    assert client.get("/").status_code == 200
    client, _ = make(tmp_path / "b", host="0.0.0.0")  # bound beyond loopback: sign-in needed
    assert client.get("/").headers["location"] == "/signin"
    assert client.get("/api/worklist/version").status_code == 401
    client, _ = make(tmp_path / "c", users=True)
    assert client.get("/").headers["location"] == "/signin"
    assert client.get("/healthz").status_code == 200  # service endpoints stay open


def test_sign_in_lock_out_and_audit(tmp_path: Path) -> None:
    client, ctx = make(tmp_path, users=True, lockout_failures=3)
    for _ in range(3):
        assert sign_in(client, "wrong password").status_code == 401
    r = sign_in(client)  # right password, but locked
    assert r.status_code == 429 and "Too many failed sign-ins" in r.text
    outcomes = [a["outcome"] for a in ctx.audit.records() if a["event"] == "sign-in"]
    assert outcomes == ["failed"] * 3 + ["locked-out"]
    client2, _ = make(tmp_path / "fresh", users=True)
    r = sign_in(client2)
    assert r.status_code == 303 and client2.get("/").status_code == 200
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_idle_session_expires_with_a_clear_message(tmp_path: Path, monkeypatch) -> None:
    client, _ = make(tmp_path, users=True, idle_timeout_seconds=60.0)
    sign_in(client)
    assert client.get("/").status_code == 200
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 61)
    r = client.get("/")
    assert r.headers["location"] == "/signin?expired=1"
    assert "ended after a period of inactivity" in client.get("/signin?expired=1").text


def test_csrf_oversize_and_unknown_study_get_clear_pages(tmp_path: Path) -> None:
    client, _ = make(tmp_path, max_body_bytes=2048)
    client.get("/")
    r = client.post("/filters", data={"state": "done"})
    assert r.status_code == 403 and "security token did not match this session" in r.text and "Traceback" not in r.text
    r = client.post("/filters", data={"state": "done", "csrf_token": "forged"})
    assert r.status_code == 403
    r = client.post("/filters", content=b"x" * 5000, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413 and "larger than this server accepts (2048 bytes)" in r.text
    r = client.get("/study/Jdoesnotexist")
    assert r.status_code == 404 and MSG_UNKNOWN_STUDY.split(".")[0] in r.text
    assert client.get("/study/..%2f..%2fetc").status_code == 404
    assert client.get("/no-such-page", headers={"accept": "application/json"}).json()["error"].startswith("not found")


def test_proxy_header_only_from_allow_listed_proxies(tmp_path: Path) -> None:
    client, _ = make(tmp_path, users=True, trusted_proxy_header="X-Remote-User", trusted_proxies=("10.9.9.9",))
    # the test client's address is not the proxy's: the header is ignored
    assert client.get("/", headers={"X-Remote-User": "drwho"}).status_code == 303
    # from the allow-listed proxy (Starlette's test client connects as "testclient") it is believed
    client, _ = make(tmp_path / "p", users=True, trusted_proxy_header="X-Remote-User", trusted_proxies=("testclient",))
    assert client.get("/", headers={"X-Remote-User": "drwho"}).status_code == 200
    assert client.get("/").status_code == 303


def test_filters_search_pagination_and_demographics_retention(tmp_path: Path) -> None:
    client, ctx = make(tmp_path, page_size=2)
    t0 = time.time() - 600
    for i in range(5):
        positive = i % 2 == 0
        ctx.worklist.upsert_study(f"2.25.{i}", [{"key": "cardiomegaly", "probability": 0.9 if positive else 0.1,
                                                 "threshold": 0.5}],
                                  received_at=t0 + i, accession=f"ACC{i}", job_id=f"J{i:04d}",
                                  demographics={"name": f"DOE^JANE{i}", "id": f"PID{i}", "age": 40.0 + i, "sex": "F"},
                                  demographics_keep_seconds=3600.0 if i else 0.0)
    jobs = lambda html: re.findall(r'data-job="(J\d+)"', html)  # noqa: E731
    first = jobs(client.get("/").text)
    assert len(first) == 2 and "page 1 of 3" in client.get("/").text
    assert jobs(client.get("/?page=3").text) == ["J0003"]  # positives first (0, 2, 4 by score, FIFO), then 1, 3
    token = csrf(client, "/")
    client.post("/filters", data={"finding": "cardiomegaly", "csrf_token": token})
    assert "3 studies" in client.get("/").text
    client.post("/filters", data={"q": "PID3", "csrf_token": token})
    html = client.get("/").text
    assert jobs(html) == ["J0003"] and "DOE JANE3" in html and "PID3" not in str(client.get("/").url)
    client.post("/filters", data={"q": "ACC1", "read": "all", "csrf_token": token})
    assert jobs(client.get("/").text) == ["J0001"]
    # demographics past their retention are blanked; the entry stays
    assert ctx.worklist.purge_demographics() == 1
    client.post("/filters", data={"clear": "1", "csrf_token": token})
    html = client.get("/?page=1").text
    assert "DOE JANE0" not in html and "Job J0000" in html


def test_https_on_the_web_port_with_secure_cookies(tmp_path: Path) -> None:
    """[web] tls_cert / tls_key: the pages are served over HTTPS (uvicorn, a real socket) and
    the session cookie is marked Secure; a plain-HTTP request gets no page."""
    import http.client
    import ssl
    import subprocess

    from cxr_ai.service.web.server import WebServer

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "web.key", "-out", "web.pem", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1")
    client, ctx = make(tmp_path / "w", users=True, tls_cert=str(tmp_path / "web.pem"), tls_key=str(tmp_path / "web.key"))
    server = WebServer(client.app, host="127.0.0.1", port=0, settings=ctx.settings)
    port = server.start()
    try:
        tls = ssl.create_default_context(cafile=str(tmp_path / "web.pem"))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=20)
        conn.request("GET", "/signin")
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200 and b"Sign in" in body
        cookie = r.getheader("set-cookie").lower()
        assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        assert "max-age=31536000" in r.getheader("strict-transport-security")
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        plain.request("GET", "/signin")
        try:
            answer = plain.getresponse()
            assert answer.status != 200
        except (http.client.HTTPException, ConnectionError):
            pass  # the TLS server drops a plain-HTTP client: that is the refusal
    finally:
        server.stop()


def test_feedback_is_for_radiologists(tmp_path: Path) -> None:
    client, ctx = make(tmp_path, users=True)
    UserStore(ctx.settings.users_file).add("boss", password=PASSWORD, role="admin")
    r = client.post("/signin", data={"name": "boss", "password": PASSWORD, "csrf_token": csrf(client)})
    assert r.status_code == 303
    token = csrf(client, "/")
    r = client.post("/study/J0001/feedback", data={"verdict_cardiomegaly": "agree", "csrf_token": token})
    assert r.status_code == 403 and "cannot give feedback" in r.text
    assert ctx.feedback.for_job("J0001") == []


def test_further_pages_plug_in_with_the_same_access_rules(tmp_path: Path) -> None:
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request):  # noqa: ANN001, ANN202
        user = request.app.state.pages.require_user(request)
        return PlainTextResponse(f"hello {user.role}")

    async def change(request):  # noqa: ANN001, ANN202
        request.app.state.pages.require_user(request)
        form = await request.app.state.pages.check_csrf(request)
        return PlainTextResponse(form.get("x", ""))

    settings_dir = tmp_path / "x"
    client, ctx = make(settings_dir, users=True)
    app = create_app(ctx, extra_routes=[Route("/ops/hello", hello), Route("/ops/change", change, methods=["POST"])])
    client = TestClient(app, follow_redirects=False)
    assert client.get("/ops/hello").headers["location"] == "/signin"
    sign_in(client)
    assert client.get("/ops/hello").text == "hello radiologist"
    assert client.post("/ops/change", data={"x": "1"}).status_code == 403
    assert client.post("/ops/change", data={"x": "1", "csrf_token": csrf(client, "/")}).text == "1"


def test_marking_a_study_read_marks_only_the_patient_shown(tmp_path: Path) -> None:
    """A sender reused one Study Instance UID for two patients: two jobs, two worklist entries.
    Marking one read on its study page leaves the other patient's entry unread."""
    client, ctx = make(tmp_path, users=True)
    uid = "1.2.826.0.1.7"
    jobs = {}
    for key, person, p in (("a1" * 32, "DOE^ANNA", 0.9), ("b2" * 32, "ROE^BORIS", 0.2)):
        study = ctx.store.record_instance(study_key=uid, study_uid=uid, sop_key=f"i{key[:2]}",
                                          sop_uid=f"{uid}.{key[:2]}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                                          path=str(tmp_path / key[:2]), size=1, patient_fp=f"fp-{key[:2]}")
        jobs[key] = study.job_id
        ctx.worklist.upsert_study(uid, [{"key": "cardiomegaly", "probability": p, "threshold": 0.5}],
                                  patient_key=key, job_id=study.job_id, demographics={"name": person, "id": person[:3], "age": 50.0, "sex": "O"})
    assert len(set(jobs.values())) == 2
    assert sign_in(client).status_code == 303
    page = client.get(f"/study/{jobs['a1' * 32]}")
    assert page.status_code == 200 and "DOE" in page.text and "ROE" not in page.text
    assert 'id="shared-uid"' in page.text and "also received for 1 other patient." in page.text
    assert not (ctx.spool.results / jobs["a1" * 32]).exists()  # a page view writes nothing
    token = csrf(client, "/")
    r = client.post(f"/study/{jobs['a1' * 32]}/feedback", data={"read": "1", "csrf_token": token})
    assert r.status_code == 303
    assert ctx.worklist.by_job(jobs["a1" * 32]).read_at is not None
    assert ctx.worklist.by_job(jobs["b2" * 32]).read_at is None
    assert [s.job_id for s in ctx.worklist.ranked()] == [jobs["b2" * 32]]
