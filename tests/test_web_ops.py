"""The operations page in a real browser (Debian's chromium, headless) with known truth.

A running service (the shipped demo model) receives phantom studies by C-STORE with an
injected acquisition shift for one group (race=Black, shift_strength 1.0); the ground truth
arrives by `cxr-ai truth load` from another process; the service's monitor updates on its own;
the open operations page then shows a flagged gap for the shifted group and for no other
group, the truth coverage by source, health, queues and a dead letter that the admin re-queues
(audited). A radiologist cannot open the page. Screenshot: docs/screenshots/ops.png.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_ai.config import load_config
from cxr_ai.net.scu import Peer, send_files
from cxr_ai.phantoms import PhantomConfig, generate_studies
from cxr_ai.service import Service
from cxr_ai.service.web.auth import UserStore
from test_service import write_toml
from test_web_browser import browser, settled, shot, wait_for  # noqa: F401 - the shared chromium fixture
from test_web_second_opinion import PASSWORD, sign_in_browser

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ADMIN, READER = "root", "drwho"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ops")
    ph = tmp / "phantoms"
    labels = generate_studies(ph, PhantomConfig(n_studies=80, seed=7, size=256, shift_group={"race": "Black"},
                                                shift_strength=1.0, fraction_lateral=0.0, fraction_non_chest=0.0))
    (tmp / "not-a-folder").write_text("a file where the broken destination wants a folder\n")
    path = write_toml(tmp / "cxr-ai.toml", {
        "listener": {"port": 0, "allowed_calling_aes": ["TESTSCU"], "min_free_mb": 0.0},
        "store": {"root": str(tmp / "var"), "quiet_seconds": 0.1},
        "models": {"explain": False},
        "routing": {"poll_seconds": 0.1, "max_attempts": 1,
                    "destinations": [{"name": "files", "kind": "folder", "path": str(tmp / "out")},
                                     {"name": "broken", "kind": "folder", "path": str(tmp / "not-a-folder")}]},
        "http": {"port": 0},
        "workers": {"poll_seconds": 0.05},
        "web": {"ops_refresh_seconds": 1.0},
        "monitoring": {"update_minutes": 60.0, "truth_check_seconds": 0.5, "min_group_size": 10,
                       "n_boot": 100, "attributes": ["sex", "race"], "intersections": []},
    })
    cfg = load_config(path, env={})
    users = UserStore(tmp / "var" / "users.toml")
    users.add(ADMIN, password=PASSWORD, role="admin")
    users.add(READER, password=PASSWORD, role="radiologist")
    svc = Service(cfg, base_dir=tmp)
    svc.start()
    yield svc, ph, labels, path
    svc.stop(grace=5.0)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_AI__")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    return subprocess.run([sys.executable, "-m", "cxr_ai", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_ops_page_shows_the_flagged_gap_of_the_shifted_group(setup, browser) -> None:
    svc, ph, labels, config_path = setup
    base = svc.http_url.rstrip("/")
    d = browser

    sign_in_browser(d, base, READER)  # a radiologist: refused
    d.get(base + "/ops")
    assert "for administrators" in d.find_element("css selector", "section.error").text
    sign_in_browser(d, base, ADMIN)

    files = sorted(ph.rglob("*.dcm"))
    status = send_files(files, Peer(host="127.0.0.1", port=svc.dicom_port, ae_title="CXR_AI", calling_ae="TESTSCU"))
    assert status == [0] * len(files)
    n_studies = labels["study_uid"].nunique()
    wait_for(lambda: settled(svc, n_studies), timeout=600, what="the phantom studies processed")

    d.get(base + "/ops")
    health = {r.get_attribute("data-component"): r.text for r in d.find_elements("css selector", "#health tr")}
    assert {"listener", "workers", "model bundle", "disk", "destination files", "destination broken",
            "monitor"} <= set(health), health
    assert "ok" in health["listener"] and "ok" in health["model bundle"]
    wait_for(lambda: "PROBLEM" in d.find_element("css selector", "#health tr[data-component='destination broken']").text,
             timeout=120, what="the broken destination shown as a problem")
    assert d.find_element("id", "depth").text == "0"
    assert "no prediction in the window has ground truth yet" in d.find_element("id", "fairness").text
    plots = d.find_elements("css selector", "#throughput img.svgplot")  # the plots are there, drawn
    assert len(plots) == 4 and all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", p) for p in plots)

    # the dead letters of the broken destination, re-queued by the admin (audited)
    wait_for(lambda: d.find_elements("css selector", "#dead-letters tr[data-delivery]"), timeout=60,
             what="dead letters on the page (it refreshes itself)")
    reason = d.find_element("css selector", "#dead-letters tr[data-delivery]").text
    assert "broken" in reason
    d.find_element("css selector", "#dead-letters button.requeue").click()
    wait_for(lambda: d.find_elements("id", "requeued"), what="the re-queued notice")
    assert "1 dead letter(s) queued again" in d.find_element("id", "requeued").text
    audit = [json.loads(x) for x in (svc.settings.store_root / "audit.jsonl").read_text().splitlines()]
    requeues = [a for a in audit if a["event"] == "requeue-dead"]
    assert [(a["user"], a["requeued"]) for a in requeues] == [(ADMIN, 1)] and requeues[0]["client"]

    # the truth by CSV from another process; the monitor updates; the open page shows the gap
    out = _cli("truth", "load", str(ph / "labels.csv"), "--config", str(config_path), cwd=config_path.parent)
    assert out.returncode == 0, out.stderr
    d.execute_script("window.__same_page = 'yes';")
    wait_for(lambda: d.find_elements("id", "flagged"), timeout=300, what="a flagged gap on the open page")
    assert d.execute_script("return window.__same_page;") == "yes"  # updated by polling, no reload
    flagged_lines = [li.text for li in d.find_elements("css selector", "#flagged li.flagged-gap")]
    assert flagged_lines and all(" race = Black " in line for line in flagged_lines), flagged_lines
    flagged_rows = {(r.find_element("xpath", "./ancestor::section[1]").get_attribute("data-attribute"),
                     r.get_attribute("data-group"))
                    for r in d.find_elements("css selector", "section.fair-table tr.flagged")}
    assert flagged_rows == {("race", "Black")}, flagged_rows
    black = d.find_element("css selector", "section.fair-table[data-finding='cardiomegaly'][data-attribute='race'] "
                                           "tr[data-group='Black']").text
    assert "FLAGGED" in black and re.search(r"\d\.\d{3} \(\d\.\d{3}-\d\.\d{3}\)", black), black  # value with CI
    others = d.find_elements("css selector", "section.fair-table[data-attribute='race'] tr[data-group]:not(.flagged)")
    assert others and all("FLAGGED" not in r.text for r in others)
    coverage = d.find_element("id", "coverage").text
    n_csv = re.search(r"cardiomegaly (\d+) (\d+) \(\d+ %\) (\d+)", coverage)
    assert n_csv and int(n_csv.group(1)) == n_studies and int(n_csv.group(3)) == n_studies, coverage
    text = d.find_element("id", "fairness").text
    assert "group too small" in text or "insurance: not recorded" in text  # groups without numbers say why
    assert d.find_elements("css selector", "img.svgplot[alt='cardiomegaly: calibration by race']")
    assert d.find_elements("css selector", "img.svgplot[alt*='gap by race']")
    d.execute_script("document.querySelector(\"section.fair-table[data-finding='cardiomegaly']"
                     "[data-attribute='race']\").scrollIntoView();")
    shot(d, "ops.png")
