"""deploy/: the Prometheus alert rules pass promtool (syntax and its rule unit tests), name only
metrics a real service exports, and the logrotate recipe rotates a log file."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from cxr_ai.monitoring.runner import _HELP as MONITOR_METRICS
from cxr_ai.service import Service
from test_service import StubPipeline, base_config, http_get

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "cxr-ai-alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "cxr-ai-alerts.test.yml"
LOGROTATE = REPO / "deploy" / "logrotate" / "cxr-ai"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: `make setup` installs it (Debian package in the Makefile's DEBIAN_PACKAGES)"
    return path


def test_alert_rules_pass_promtool() -> None:
    promtool = _tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS: 6 rules found" in check.stdout, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True,
                          text=True, timeout=60)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def test_alert_rules_name_metrics_the_service_exports(tmp_path: Path) -> None:
    svc = Service(base_config(tmp_path, []), pipeline_factory=StubPipeline, base_dir=tmp_path).start()
    try:
        status, body = http_get(svc.http_port, "/metrics")
    finally:
        svc.stop(grace=1)
    assert status == 200
    text = body.decode()
    exported = set(re.findall(r"^# TYPE (\w+) ", text, flags=re.M))
    assert re.search(r"^cxr_ai_model_bundle_present 1\.0$", text, flags=re.M)
    assert re.search(r"^cxr_ai_oldest_queued_seconds 0\.0$", text, flags=re.M)
    used = set(re.findall(r"\b(cxr_ai_\w+)", "\n".join(re.findall(r"expr: (.*)", RULES.read_text()))))
    assert used >= {"cxr_ai_oldest_queued_seconds", "cxr_ai_dead_letters", "cxr_ai_spool_free_bytes",
                    "cxr_ai_spool_min_free_bytes", "cxr_ai_model_bundle_present", "cxr_ai_fairness_alert"}
    # the per-alert series exist only while an alert stands; every other name is exported now
    assert used - exported <= set(MONITOR_METRICS), used - exported


def test_logrotate_recipe_rotates_the_service_log(tmp_path: Path) -> None:
    logrotate = _tool("logrotate")
    logs = tmp_path / "log"
    logs.mkdir()
    conf = LOGROTATE.read_text().replace("/var/log/cxr-ai", str(logs))
    # the recipe's owner lines name the service account; this test runs as whoever it is
    conf = "\n".join(line for line in conf.splitlines() if not line.strip().startswith(("su ", "create ")))
    (tmp_path / "cxr-ai.conf").write_text(conf + "\n")
    log = logs / "cxr-ai.log"
    log.write_text('{"level": "INFO", "message": "started"}\n' * 1000)
    data = logs / "predictions.jsonl"  # a data file beside it is never rotated
    data.write_text("{}\n")
    dry = subprocess.run([logrotate, "-d", "-s", str(tmp_path / "state"), str(tmp_path / "cxr-ai.conf")],
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    run = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(tmp_path / "cxr-ai.conf")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    rotated = [p for p in logs.iterdir() if p.name.startswith("cxr-ai.log-")]
    assert len(rotated) == 1 and rotated[0].read_text().count("started") == 1000
    assert log.exists() and log.stat().st_size == 0  # copytruncate: the service keeps writing to it
    assert data.read_text() == "{}\n" and sorted(p.name for p in logs.iterdir()) == sorted(
        ["cxr-ai.log", rotated[0].name, "predictions.jsonl"])
