"""The worklist and study pages in a real browser (Debian's chromium, headless, driven by
Selenium through Debian's chromedriver) against a running ``cxr-ai serve`` service with the real
pipeline: phantoms go in by C-STORE, a radiologist signs in, reads the ranked worklist, sees
a new study arrive without a reload, looks at the heatmap, gives feedback, and that feedback
reaches the monitoring window. Screenshots go to docs/screenshots/ (the README shows them).
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cxr_ai.config import load_config
from cxr_ai.monitoring.performance import PerformanceMonitor
from cxr_ai.monitoring.truth import FEEDBACK_SOURCE
from cxr_ai.net.scu import Peer, send_files
from cxr_ai.phantoms import PhantomConfig, generate_studies
from cxr_ai.service import Service
from cxr_ai.store.jobs import StudyState
from cxr_ai.service.web.auth import UserStore
from cxr_ai.worklist import TriagePolicy

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "docs" / "screenshots"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
USER, PASSWORD = "drwho", "a long enough password"
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000")

pytestmark = pytest.mark.slow


def wait_for(pred, *, timeout: float = 90.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[list[Path]]:
    """Five frontal chest phantom studies (files grouped per study, in generation order)."""
    root = tmp_path_factory.mktemp("phantoms")
    labels = generate_studies(root, PhantomConfig(n_studies=5, seed=11, size=256, fraction_lateral=0.0,
                                                  fraction_non_chest=0.0, prevalence_cardiomegaly=0.5))
    studies: dict[str, list[Path]] = {}
    for f in sorted(root.rglob("*.dcm")):
        import pydicom

        studies.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID), []).append(f)
    assert len(studies) == 5 and len(labels)
    return list(studies.values())


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc")
    cfg = load_config(env={})
    cfg["listener"].update(port=0, allowed_calling_aes=["TESTSCU"], min_free_mb=0.0)
    cfg["store"].update(root=str(tmp / "var"), quiet_seconds=0.2, keep_hours=-1.0)
    cfg["workers"].update(poll_seconds=0.05)
    cfg["routing"].update(poll_seconds=0.1, destinations=[{"name": "folder", "kind": "folder", "path": str(tmp / "out")}])
    cfg["http"].update(port=0)
    cfg["worklist"].update(wait_from="received")  # phantoms carry historical study dates
    cfg["web"].update(viewer_url="https://viewer.example/ohif?StudyInstanceUIDs={StudyInstanceUID}")
    UserStore(tmp / "var" / "users.toml").add(USER, password=PASSWORD, role="radiologist")
    svc = Service(cfg, base_dir=tmp)
    svc.start()
    svc.test_config = cfg
    yield svc
    svc.stop(grace=5.0)


@pytest.fixture(scope="module")
def browser():
    for exe in (CHROMIUM, CHROMEDRIVER):
        assert Path(exe).is_file(), f"{exe} is missing: install Debian's chromium and chromium-driver (make setup)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=ChromeService(executable_path=CHROMEDRIVER), options=opts)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def send(svc: Service, files: list[Path]) -> None:
    send_files(files, Peer(host="127.0.0.1", port=svc.dicom_port, ae_title="CXR_AI", calling_ae="TESTSCU"))


def settled(svc: Service, n_studies: int) -> bool:
    studies = svc.store.studies()
    return len(studies) >= n_studies and all(s.state in (StudyState.DONE, StudyState.NOT_APPLICABLE, StudyState.FAILED)
                                             for s in studies)


def expected_order(svc: Service) -> list[str]:
    """The ranking rule computed here from the job store's results (not by the worklist code):
    positives by weighted probability, then the rest first in, first out (none is overdue)."""
    policy = TriagePolicy.from_config(svc.test_config)
    keyed = []
    for s in svc.store.studies():
        score = 0.0
        for inst in svc.store.instances(s.study_key):
            for f in (inst.result or {}).get("findings", []):
                if f["positive"]:
                    score = max(score, policy.weight(f["key"]) * f["probability"])
        keyed.append(((0, -score, s.created_at) if score > 0 else (1, s.created_at, 0.0), s.job_id))
    return [job for _, job in sorted(keyed)]


def shown_jobs(driver) -> list[str]:
    """The rows' job ids, read in one step (the live update may swap the rows at any moment)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#rows tr[data-job]')).map(tr => tr.dataset.job);")


def shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / name))


def http(url: str, *, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_radiologist_worklist_study_feedback_in_chromium(service, browser, phantoms) -> None:
    base = service.http_url.rstrip("/")
    d = browser

    # no session: refused (the page sends to sign-in; the data endpoint answers 401)
    d.get(base + "/")
    assert d.current_url.startswith(base + "/signin"), d.current_url
    assert http(base + "/api/worklist/version", headers={"Accept": "application/json"})[0] == 401
    assert http(base + "/worklist/rows")[0] in (401, 303, 200) and b"data-job" not in http(base + "/worklist/rows")[1]

    # a wrong password is refused, the right one signs in
    d.find_element("id", "name").send_keys(USER)
    d.find_element("id", "password").send_keys("wrong password!")
    d.find_element("id", "signin").click()
    alert = wait_for(lambda: d.find_elements("css selector", "[role=alert]"),  # the answer page loads
                     what="the sign-in refusal")[0]
    assert "wrong" in alert.text
    d.find_element("id", "name").clear()
    d.find_element("id", "name").send_keys(USER)
    d.find_element("id", "password").send_keys(PASSWORD)
    shot(d, "signin.png")
    d.find_element("id", "signin").click()
    wait_for(lambda: d.current_url.rstrip("/") == base, what="the worklist after sign-in")
    cookie = d.get_cookie("cxr_ai_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # three studies by C-STORE to the running listener: shown in the ranking's order
    for files in phantoms[:3]:
        send(service, files)
        time.sleep(0.3)  # distinct receipt times: first in, first out is observable
    wait_for(lambda: settled(service, 3), what="three studies processed")
    d.get(base + "/")
    # (a study's results may be delivered a moment before it is on the worklist: the page catches up live)
    wait_for(lambda: shown_jobs(d) == expected_order(service), timeout=30, what="the ranked rows")
    rows_text = d.execute_script("return document.getElementById('rows').innerText;")
    assert "≥" in rows_text or "<" in rows_text  # finding badges: probability against threshold
    first_job = shown_jobs(d)[0]

    # a new study appears without a reload
    d.execute_script("window.__same_page = 'yes';")
    send(service, phantoms[3])
    wait_for(lambda: settled(service, 4), what="the fourth study processed")
    wait_for(lambda: len(shown_jobs(d)) == 4, timeout=30, what="the new row on the open page")
    wait_for(lambda: shown_jobs(d) == expected_order(service), timeout=30, what="the ranked rows")
    assert d.execute_script("return window.__same_page;") == "yes", "the page was reloaded"
    shot(d, "worklist.png")

    # the study page: heatmap over the image, the slider changes it, on/off hides it
    positive = next((job for job in expected_order(service)
                     if any(f["positive"] for s in service.store.studies() if s.job_id == job
                            for i in service.store.instances(s.study_key)
                            for f in (i.result or {}).get("findings", []))), first_job)
    d.get(f"{base}/study/{positive}")
    assert "/study/" in d.current_url and "1.2." not in d.current_url  # opaque id, no UID or PHI in the URL
    assert not d.find_elements("id", "shared-uid")  # its Study UID is this patient's alone
    img = d.find_element("id", "radiograph")
    wait_for(lambda: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img),
             what="the radiograph image")
    assert d.execute_script("return arguments[0].naturalWidth", img) <= 1024
    heat = d.find_element("css selector", "img.heat:not([hidden])")
    wait_for(lambda: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heat),
             what="the heatmap image")
    before = float(heat.value_of_css_property("opacity"))
    slider = d.find_element("id", "opacity")
    from selenium.webdriver.common.keys import Keys

    for _ in range(30):
        slider.send_keys(Keys.ARROW_RIGHT)
    after = float(heat.value_of_css_property("opacity"))
    assert after > before + 0.2, (before, after)
    assert "NOT FOR DIAGNOSTIC USE" in d.find_element("id", "nfdu").text
    assert d.find_element("id", "viewer").get_attribute("href").startswith("https://viewer.example/ohif?")
    d.execute_script("window.scrollTo(0, 0);")
    shot(d, "study.png")
    d.find_element("id", "heat-on").click()
    assert not heat.is_displayed()
    d.find_element("id", "heat-on").click()
    assert heat.is_displayed()

    # feedback: agree on cardiomegaly, low EF uncertain, mark read
    d.find_element("css selector", "input[name=verdict_cardiomegaly][value=agree]").click()
    d.find_element("css selector", "input[name=verdict_low_ef][value=uncertain]").click()
    d.find_element("id", "mark-read").click()
    d.find_element("id", "save-feedback").click()
    wait_for(lambda: d.find_elements("id", "saved"), what="the saved notice")

    # it reaches the monitoring truth feed and the monitoring window, reported apart
    monitor = PerformanceMonitor.from_config({**service.test_config,
                                              "store": {**service.test_config["store"],
                                                        "root": str(service.settings.store_root)}})
    truth = [r for r in monitor.truth_store.records() if r["source"] == FEEDBACK_SOURCE]
    assert [(r["finding"], r["study_uid"]) for r in truth] == [
        ("cardiomegaly", next(s.study_uid for s in service.store.studies() if s.job_id == positive))]
    assert truth[0]["reader"].startswith("reader-") and USER not in json.dumps(truth)
    record = monitor.update()
    assert record["feedback"]["truth_match"]["cardiomegaly"]["by_study"] >= 1
    assert record["feedback"]["truth"].startswith(FEEDBACK_SOURCE)
    assert "cardiomegaly" in record["feedback"]["result"]["findings"]
    assert record["feedback"]["result"]["findings"]["cardiomegaly"]["attributes"]  # subgroup figures
    assert record["truth_match"].get("cardiomegaly", {}).get("by_study", 0) == 0  # not mixed with independent truth

    # the read study leaves the unread worklist
    d.get(base + "/")
    assert positive not in shown_jobs(d)

    # a POST without the CSRF token is refused, even with a valid session
    status = d.execute_script(
        "const r = await fetch(arguments[0], {method: 'POST', credentials: 'same-origin',"
        " headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: 'verdict_cardiomegaly=disagree&read=0'});"
        " return r.status;", f"{base}/study/{positive}/feedback")
    assert status == 403
    assert len([r for r in monitor.truth_store.records() if r["source"] == FEEDBACK_SOURCE]) == 1

    # the audit log names who did what, with job ids only
    audit = [json.loads(line) for line in (service.settings.store_root / "audit.jsonl").read_text().splitlines()]
    events = [(a["event"], a["outcome"]) for a in audit]
    for expected in [("sign-in", "failed"), ("sign-in", "success"), ("study-view", "success"),
                     ("feedback", "success"), ("csrf-refused", "refused")]:
        assert expected in events, (expected, events)
    text = json.dumps(audit)
    for s in service.store.studies():
        assert s.study_uid not in text
