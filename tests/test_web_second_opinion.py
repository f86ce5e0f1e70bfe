"""The second-opinion page in a real browser (Debian's chromium, headless) and its JSON API
(httpx), against a running ``cxr-ai serve`` service with the shipped demo model: the real RG1
chest PA as DICOM and as PNG, the RG3 tibia the gate refuses, and every kind of bad input,
each with a clear message and the right status while the server keeps serving. Uploads never
reach the job store, the worklist, the prediction log or the outbox. Screenshots go to
docs/screenshots/."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr_ai.config import load_config
from cxr_ai.dicom.reader import read_radiograph
from cxr_ai.imaging import display_array
from cxr_ai.service import Service
from cxr_ai.service.web.auth import UserStore
from cxr_ai.service.web.second_opinion_page import DownloadStore, RateLimit
from test_web_browser import browser, shot, wait_for  # noqa: F401 - the shared chromium fixture

pytestmark = pytest.mark.slow

READER, ADMIN, API_USER = "drwho", "root", "pacs-tool"
PASSWORD = "a long enough password"
LIMIT_MB = 8.0  # RG1 uncompressed (7.2 MB) fits; the over-the-limit file does not
PER_MINUTE = 40


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("so-svc")
    cfg = load_config(env={})
    cfg["listener"].update(port=0, allowed_calling_aes=["TESTSCU"], min_free_mb=0.0)
    cfg["store"].update(root=str(tmp / "var"), quiet_seconds=0.2)
    cfg["routing"].update(destinations=[{"name": "folder", "kind": "folder", "path": str(tmp / "out")}])
    cfg["http"].update(port=0)
    cfg["web"].update(max_upload_mb=LIMIT_MB, second_opinion_per_minute=PER_MINUTE)
    users = UserStore(tmp / "var" / "users.toml")
    for name, role in ((READER, "radiologist"), (ADMIN, "admin"), (API_USER, "radiologist")):
        users.add(name, password=PASSWORD, role=role)
    svc = Service(cfg, base_dir=tmp)
    svc.start()
    yield svc
    svc.stop(grace=5.0)


# -- inputs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rg1_png(rg1_paths) -> bytes:
    rg = read_radiograph(rg1_paths["RG1_UNCR"], decode=True)
    display = display_array(rg.dataset, rg.pixels())[0]
    buf = io.BytesIO()
    Image.fromarray(np.rint(display[::2, ::2] * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (8-bit grayscale)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_inputs(rg1_paths, rg1_png: bytes) -> dict[str, tuple[str, bytes, int, str]]:
    """name -> (file name, bytes, HTTP status, words the message must hold)."""
    gray = np.asarray(Image.open(io.BytesIO(rg1_png)))[::2, ::2]
    apng = io.BytesIO()
    Image.fromarray(gray).save(apng, format="PNG", save_all=True, append_images=[Image.fromarray(255 - gray)])
    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"])  # a 2-frame DICOM, small enough for the limit
    px = ds.pixel_array[::4, ::4].copy()
    ds.Rows, ds.Columns = px.shape
    ds.NumberOfFrames = 2
    ds.PixelData = px.tobytes() * 2
    multi = io.BytesIO()
    ds.save_as(multi)
    h, w = 400, 600  # a synthetic colour photo (of a cat, say): warm gradient, blue disc
    y, x = np.mgrid[0:h, 0:w]
    cat = np.stack([200 + 55 * x / w, 120 + 80 * y / h, 60 + 0 * x], axis=-1)
    cat[(x - 300) ** 2 + (y - 200) ** 2 < 80 ** 2] = (30, 60, 220)
    jpg = io.BytesIO()
    Image.fromarray(cat.astype(np.uint8)).save(jpg, format="JPEG", quality=90)
    rg1 = rg1_paths["RG1_J2KR"].read_bytes()
    return {
        "not an image": ("letter.txt", b"Dear doctor, please find attached...\n" * 20, 415, "not a DICOM, PNG or JPEG"),
        "truncated": ("cut.dcm", rg1[: len(rg1) // 2], 400, "truncated"),
        "60000 x 60000 claimed": ("huge.png", _png_claiming(60000, 60000), 413, "60000 x 60000"),
        "multi-frame DICOM": ("two.dcm", multi.getvalue(), 422, "2 frames"),
        "multi-frame PNG": ("cine.png", apng.getvalue(), 422, "2 frames"),
        "colour photo": ("cat.jpg", jpg.getvalue(), 422, "a colour image"),
        "empty": ("empty.png", b"", 400, "the file is empty"),
        "over the limit": ("big.dcm", b"\0" * int((LIMIT_MB + 1) * 2**20), 413, "larger than this server accepts"),
    }


# -- the HTTP API --------------------------------------------------------------------------------
def signed_in(base: str, name: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=120, follow_redirects=False)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/signin").text).group(1)
    r = client.post("/signin", data={"name": name, "password": PASSWORD, "csrf_token": token})
    assert r.status_code == 303, r.text
    return client


def test_api_answers_json_with_links_and_clear_errors(service, rg1_paths, rg3_paths, rg1_png) -> None:
    from jsonschema import Draft202012Validator
    from openapi_spec_validator import validate

    base = service.http_url.rstrip("/")
    spec = httpx.get(base + "/api/v1/openapi.json").json()
    validate(spec)  # a valid OpenAPI document
    answer_schema = Draft202012Validator({"$ref": "#/components/schemas/Answer", "components": spec["components"]})
    error_schema = Draft202012Validator({"$ref": "#/components/schemas/Error", "components": spec["components"]})
    assert "/api/v1/second-opinion" in spec["paths"]

    anonymous = httpx.Client(base_url=base, timeout=60)
    r = anonymous.post("/api/v1/second-opinion", files={"file": ("x.png", rg1_png, "image/png")},
                       headers={"X-CSRF-Token": "x"})
    assert r.status_code == 401 and "Sign in" in r.json()["error"]

    client = signed_in(base, API_USER)
    token = client.get("/api/v1/csrf").json()["csrf_token"]
    hdr = {"X-CSRF-Token": token}
    r = client.post("/api/v1/second-opinion", files={"file": ("x.png", rg1_png, "image/png")})
    assert r.status_code == 403 and "X-CSRF-Token" in r.json()["error"]  # no header: refused
    r = client.post("/api/v1/second-opinion", files={"file": ("x.png", rg1_png, "image/png")},
                    headers={"X-CSRF-Token": "forged"})
    assert r.status_code == 403

    r = client.post("/api/v1/second-opinion", headers=hdr,
                    files={"file": ("RG1.dcm", rg1_paths["RG1_UNCR"].read_bytes(), "application/dicom")})
    assert r.status_code == 200, r.text
    ans = r.json()
    answer_schema.validate(ans)
    assert ans["accepted"] and ans["applicability_verified"] and ans["kind"] == "dicom"
    assert [f["key"] for f in ans["findings"]] == ["cardiomegaly", "low_ef"]
    assert {o["kind"] for o in ans["links"]["objects"]} == {"SR", "SC", "PM", "FHIR Bundle"}
    sr = next(o for o in ans["links"]["objects"] if o["kind"] == "SR")
    assert "1.2." not in sr["url"] and "RG1" not in sr["url"]  # opaque ids, no UID or name in URLs
    got = client.get(sr["url"])
    assert got.status_code == 200 and got.headers["content-type"] == "application/dicom"
    assert pydicom.dcmread(io.BytesIO(got.content)).Modality == "SR"
    bundle = client.get(next(o["url"] for o in ans["links"]["objects"] if o["kind"] == "FHIR Bundle")).json()
    assert bundle["resourceType"] == "Bundle"
    assert anonymous.get(sr["url"]).status_code in (303, 401)  # not without sign-in (to the sign-in page)
    assert signed_in(base, READER).get(sr["url"]).status_code == 404  # nor for another user

    r = client.post("/api/v1/second-opinion", headers=hdr, files={"file": ("rg1.png", rg1_png, "image/png")})
    assert r.status_code == 200
    ans = r.json()
    answer_schema.validate(ans)
    assert not ans["applicability_verified"] and ans["applicability"] == "applicability not verified: no DICOM header"
    assert ans["assumptions"] and not ans["links"]["objects"]
    overlay = client.get(ans["links"]["overlays"]["cardiomegaly"])
    assert overlay.headers["content-type"] == "image/png" and Image.open(io.BytesIO(overlay.content)).mode == "RGB"

    r = client.post("/api/v1/second-opinion", headers=hdr,
                    files={"file": ("tibia.dcm", rg3_paths["RG3_UNCR"].read_bytes(), "application/dicom")})
    assert r.status_code == 422 and not r.json()["accepted"] and r.json()["findings"] == []
    assert "body part" in r.json()["message"].lower() or "chest" in r.json()["message"].lower(), r.json()["message"]

    for case, (name, data, status, words) in bad_inputs(rg1_paths, rg1_png).items():
        r = client.post("/api/v1/second-opinion", headers=hdr, files={"file": (name, data, "application/octet-stream")})
        assert r.status_code == status, (case, r.status_code, r.text[:300])
        body = r.json()
        if "error" in body:
            error_schema.validate(body)
        else:  # a DICOM the gate refused (several frames): the answer, not applicable, with the reason
            answer_schema.validate(body)
            assert not body["accepted"] and body["findings"] == []
        assert words in body.get("error", body.get("message", "")), (case, body)
        assert httpx.get(base + "/healthz").status_code == 200, case  # still serving

    # no declared length (chunked): the limit is checked on the chunks as they are read (the
    # handler stops at the limit; uvicorn drops the rest without keeping it)
    def stream():
        boundary = b"--b0undary"
        yield boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.dcm"\r\n\r\n'
        for _ in range(int(LIMIT_MB) * 4 + 16):  # 256 KiB chunks, past the limit
            yield b"\0" * 2**18
        yield b"\r\n" + boundary + b"--\r\n"

    r = client.post("/api/v1/second-opinion", headers={**hdr, "content-type": "multipart/form-data; boundary=b0undary"},
                    content=stream())
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and "larger than this server accepts" in r.json()["error"]
    assert httpx.get(base + "/healthz").status_code == 200

    # nothing of the uploads entered the listener's side
    assert service.store.studies() == [] and not any(service.store.counts().get("outbox", {}).values())
    mon = service.settings.store_root / "monitoring" / "predictions.jsonl"
    assert not mon.exists() or mon.read_text() == ""
    assert not (service.settings.store_root / "uploads").exists()
    audit = [json.loads(x) for x in (service.settings.store_root / "audit.jsonl").read_text().splitlines()]
    refused = [a for a in audit if a["event"] == "second-opinion" and a["outcome"] == "refused"]
    assert len(refused) >= 6 and "letter" not in json.dumps(audit)  # no file names in the audit log

    # past the per-user limit: 429
    for i in range(PER_MINUTE + 1):
        r = client.post("/api/v1/second-opinion", headers=hdr, files={"file": ("e.png", b"", "image/png")})
        if r.status_code == 429:
            break
        assert r.status_code == 400
    assert r.status_code == 429 and "a minute" in r.json()["error"]


# -- the page in chromium ----------------------------------------------------------------------------
def sign_in_browser(d, base: str, name: str) -> None:
    d.delete_all_cookies()
    d.get(base + "/signin")
    d.find_element("id", "name").send_keys(name)
    d.find_element("id", "password").send_keys(PASSWORD)
    d.find_element("id", "signin").click()
    wait_for(lambda: d.current_url.rstrip("/") == base, what="signed in")


def upload(d, base: str, path: Path) -> None:
    d.get(base + "/second-opinion")
    d.find_element("id", "file").send_keys(str(path))
    d.find_element("id", "send").click()
    wait_for(lambda: d.find_elements("id", "so-result") or d.find_elements("id", "so-error")
             or d.find_elements("css selector", "section.error") or
             (d.find_element("id", "client-error").is_displayed() and d.find_elements("id", "client-error")),
             timeout=120, what=f"the answer for {path.name}")


def test_second_opinion_page_in_chromium(service, browser, rg1_paths, rg3_paths, rg1_png, tmp_path) -> None:
    base = service.http_url.rstrip("/")
    d = browser
    d.delete_all_cookies()
    d.get(base + "/second-opinion")
    assert d.current_url.startswith(base + "/signin")  # sign-in first
    sign_in_browser(d, base, READER)

    upload(d, base, rg1_paths["RG1_UNCR"])
    rows = d.find_elements("css selector", "#so-findings tbody tr")
    assert [r.get_attribute("data-finding") for r in rows] == ["cardiomegaly", "low_ef"]
    for r in rows:
        prob = r.find_elements("tag name", "td")[1].text
        assert re.fullmatch(r"(0\.\d\d|[<>] 0\.\d\d)", prob), prob
        assert r.find_elements("tag name", "td")[3].text in ("positive", "negative")
    assert "NOT FOR CLINICAL USE" in d.find_element("id", "nfdu").text
    assert not d.find_elements("id", "not-verified")
    assert d.find_element("id", "model").text.strip()
    kinds = [a.text for a in d.find_elements("css selector", "#downloads a")]
    assert {"SR", "SC", "FHIR Bundle"} <= set(kinds), kinds
    heat = d.find_element("css selector", "img.heat:not([hidden])")
    wait_for(lambda: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heat),
             what="the heatmap")
    from selenium.webdriver.common.keys import Keys

    before = float(heat.value_of_css_property("opacity"))
    for _ in range(30):
        d.find_element("id", "opacity").send_keys(Keys.ARROW_RIGHT)
    assert float(heat.value_of_css_property("opacity")) > before + 0.2
    d.find_element("id", "heat-on").click()
    assert not heat.is_displayed()
    d.find_element("id", "heat-on").click()
    sr_url = next(a.get_attribute("href") for a in d.find_elements("css selector", "#downloads a") if a.text == "SR")
    status = d.execute_script("const r = await fetch(arguments[0]); return [r.status, r.headers.get('content-type')];",
                              sr_url)
    assert status == [200, "application/dicom"]
    d.execute_script("window.scrollTo(0, 0);")
    shot(d, "second-opinion.png")

    png = tmp_path / "chest.png"
    png.write_bytes(rg1_png)
    upload(d, base, png)
    assert "Applicability not verified: no DICOM header" in d.find_element("id", "not-verified").text
    assert d.find_elements("css selector", "#so-findings tbody tr")
    assert "pixel spacing" in d.find_element("id", "assumptions").text
    assert any("Overlay PNG" in a.text for a in d.find_elements("css selector", "#downloads a"))

    upload(d, base, rg3_paths["RG3_UNCR"])
    refused = d.find_element("id", "gate-refused").text
    assert "Not applicable" in refused and not d.find_elements("id", "so-findings")
    shot(d, "second-opinion-rejected.png")

    for case, (name, data, status, words) in bad_inputs(rg1_paths, rg1_png).items():
        f = tmp_path / name
        f.write_bytes(data)
        upload(d, base, f)
        if case == "over the limit":  # the page refuses it before sending; the server does too
            assert "the limit is" in d.find_element("id", "client-error").text
            got = d.execute_script(
                "const fd = new FormData(); fd.append('csrf_token', document.querySelector('[name=csrf_token]').value);"
                " fd.append('file', new Blob([new Uint8Array(arguments[0])]), 'big.dcm');"
                " const r = await fetch('/second-opinion', {method: 'POST', body: fd}); return [r.status, await r.text()];",
                len(data))
            assert got[0] == 413 and words in got[1]
        else:
            shown = (d.find_elements("id", "so-error") or d.find_elements("id", "gate-refused")  # (a gate refusal)
                     or d.find_elements("css selector", "section.error"))
            assert shown, (case, d.page_source[:2000])
            text = shown[0].text
            assert words in text, (case, text)
        assert not d.find_elements("id", "so-findings")
    d.get(base + "/second-opinion")  # still serving
    assert d.find_element("id", "file")
    assert service.store.studies() == []


def test_download_store_and_rate_limit_expire() -> None:
    now = [0.0]
    store = DownloadStore(ttl=10.0, clock=lambda: now[0])
    ident = store.put(user="a", name="x-SR-1.dcm", data=b"sr")
    assert len(ident) >= 20 and store.get(ident, user="a").media_type == "application/dicom"
    assert store.get(ident, user="b") is None
    now[0] = 10.5
    assert store.get(ident, user="a") is None and len(store) == 0  # dropped after the time
    rate = RateLimit(per_minute=2, clock=lambda: now[0])
    assert rate.allow("a") and rate.allow("a") and not rate.allow("a") and rate.allow("b")
    now[0] += 60.0
    assert rate.allow("a")


def test_open_workstation_api_and_keep_uploads(tmp_path: Path, rg1_png) -> None:
    """On loopback with no users the API is open to the workstation but still needs the custom
    header (a cross-site form cannot send it); with ``keep_uploads`` the upload is kept."""
    from starlette.testclient import TestClient

    from cxr_ai.store.jobs import JobStore
    from cxr_ai.store.spool import Spool
    from cxr_ai.service.web.app import WebContext, create_app
    from cxr_ai.service.web.settings import WebSettings
    from cxr_ai.worklist import Worklist

    cfg = load_config(env={})
    cfg["store"]["root"] = str(tmp_path / "var")
    cfg["monitoring"]["dir"] = str(tmp_path / "mon")
    cfg["web"].update(keep_uploads=True, download_ttl_seconds=30.0)
    settings = WebSettings.from_config(cfg, store_root=tmp_path / "var", base_dir=tmp_path)
    assert settings.keep_uploads and settings.uploads_dir == tmp_path / "var" / "uploads"
    ctx = WebContext(settings=settings, store=JobStore(tmp_path / "jobs.sqlite3"), spool=Spool(tmp_path / "spool"),
                     worklist=Worklist(tmp_path / "wl.sqlite3"), truth=None, pseudonym_key=b"k" * 32,
                     health=lambda: {"status": "ok"}, status=lambda: {}, metrics=lambda: b"", config=cfg)
    client = TestClient(create_app(ctx))
    files = {"file": ("chest.png", rg1_png, "image/png")}
    r = client.post("/api/v1/second-opinion", files=files)
    assert r.status_code == 403  # no header: what a cross-site form would send
    r = client.post("/api/v1/second-opinion", files=files, headers={"X-CSRF-Token": "1"})
    assert r.status_code == 200 and r.json()["expires_in_seconds"] == 30.0
    kept = list((tmp_path / "var" / "uploads").iterdir())
    assert len(kept) == 1 and kept[0].read_bytes() == rg1_png and kept[0].name.endswith("-chest.png")
    r = client.post("/second-opinion", files=files)  # the page's form without its token
    assert r.status_code == 403 and "security token" in r.text
    assert client.get("/ops").status_code == 200  # open like the other pages (no service: says so)
    bad = {"X-CSRF-Token": "1"}
    from cxr_ai.errors import ConfigError

    with pytest.raises(ConfigError, match="keep_uploads must be true or false"):
        WebSettings.from_config({"web": {"keep_uploads": "yes"}}, store_root=tmp_path)
    r = client.post("/api/v1/second-opinion", headers=bad, data={"x": "1"})
    assert r.status_code == 400 and r.json()["error"].startswith("No file")
    ctx.close()
