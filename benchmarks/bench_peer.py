"""cxr-ai batch against a peer on the same DICOM folder and the same DenseNet-121 weights, one run.

The folder: ``--n`` phantom studies (one frontal DX each, ``--size`` px square, 16-bit,
uncompressed). The weights: an untrained MONAI DenseNet-121 (1 channel, 224 px, two findings;
only the cost of a forward matters) saved as a cxr-ai bundle and, the same weights, as a
TorchScript module for the peers.

- **cxr-ai**: ``python -m cxr_ai batch FOLDER --out OUT --no-explain`` (TID 1500 SR, FHIR
  bundle and the results table per image), a fresh process, start-up included.
- **MONAI Deploy App SDK** (``benchmarks/peer/sdk_app.py``): the SDK's stock operators,
  DICOM loader -> series selector -> series to volume -> inference -> DICOM text SR writer,
  composed once and run per study folder in one fresh process (start-up included), in the
  SDK's own virtual environment (``--peer-python``; the SDK is not a dependency of cxr-ai).
- **Plain script** (``benchmarks/peer/plain_script.py``): pydicom read -> MONAI transforms ->
  model -> highdicom SR, one image at a time, in this environment (cxr-ai's libraries, not
  cxr-ai: in the SDK's environment ``import monai`` also imports the SDK, which sits in MONAI's
  namespace).

Runs alternate (cxr-ai, SDK, script; ``--reps`` rounds) so that load from other processes on a
shared machine hits all alike; the best round of each is kept. Figure of merit:
``cxr-ai images/s / peer images/s`` (issue 20 target: >= 2 for 24 studies, start-up included).

Set up the peer's environment once (a CPU torch wheel, as this project's)::

    python3 -m venv /tmp/peer-venv
    /tmp/peer-venv/bin/pip install "setuptools>=77.0.3,<81" torch==2.13.0 monai pydicom highdicom \\
        monai-deploy-app-sdk==0.5.1

(SDK 0.5.1 imports ``pkg_resources``, which setuptools 81 removed; torch 2.13 needs >= 77.0.3.)

Run: ``.venv/bin/python benchmarks/bench_peer.py [--n 24] [--size 2048] [--peer-python
/tmp/peer-venv/bin/python]``; writes ``benchmarks/results/peer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_result

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _densenet(tmp: Path) -> tuple[Path, Path]:
    """The bundle (cxr-ai) and the TorchScript module (peers) of the same DenseNet-121 weights."""
    import torch

    from cxr_ai.imaging import PixelPipelineSpec
    from cxr_ai.models.bundle import FindingSpec, save_bundle
    from cxr_ai.models.networks import LogitsOnly, NetworkConfig, build_network

    torch.manual_seed(0)
    net = build_network(NetworkConfig(architecture="densenet121", input_size=224)).eval()
    bundle = save_bundle(tmp / "bench-densenet121", model=net, name="bench-densenet121", version="0",
                         findings=[FindingSpec("cardiomegaly", "Cardiomegaly", 0.5),
                                   FindingSpec("low_ef", "Low ejection fraction", 0.5)],
                         pipeline=PixelPipelineSpec(size=224), description="benchmark", intended_use="benchmark")
    with torch.no_grad():
        traced = torch.jit.trace(LogitsOnly(net).eval(), torch.rand(1, 1, 224, 224))
    ts = tmp / "densenet121.ts"
    traced.save(str(ts))
    return bundle, ts


def _timed(cmd: list[str], *, env: dict[str, str] | None = None) -> tuple[float, str, int]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    return time.perf_counter() - t0, (proc.stdout + proc.stderr)[-3000:], proc.returncode


def _peer_can_run(python: str) -> tuple[bool, str]:
    """Whether the SDK imports in ``python`` (and why not)."""
    if not Path(python).exists():
        return False, f"{python} does not exist (set up the peer's virtual environment, see the docstring)"
    probe = ("import monai.deploy.core, monai.deploy.operators, torch, highdicom, pydicom; "
             "print(monai.deploy.__version__)")
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        return False, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "import failed"
    return True, proc.stdout.strip()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24, help="studies (default 24)")
    ap.add_argument("--size", type=int, default=2048, help="phantom side in pixels (default 2048)")
    ap.add_argument("--reps", type=int, default=2, help="rounds (default 2; the best of each kept)")
    ap.add_argument("--peer-python", default="/tmp/peer-venv/bin/python",
                    help="python of the peer's environment (MONAI Deploy App SDK 0.5.1)")
    ap.add_argument("--out", default=str(HERE / "results" / "peer.json"))
    args = ap.parse_args(argv)

    from cxr_ai.phantoms import PhantomConfig, generate_studies

    tmp = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    try:
        folder = tmp / "studies"
        generate_studies(folder, PhantomConfig(n_studies=args.n, seed=3, size=args.size, fraction_lateral=0.0,
                                               fraction_non_chest=0.0, modalities=("DX",)))
        for extra in folder.iterdir():  # the phantom generator's label CSV is no DICOM
            if extra.is_file():
                extra.unlink()
        n_images = len(list(folder.rglob("*.dcm")))
        bundle, ts = _densenet(tmp)
        cfg = tmp / "cxr-ai.toml"
        cfg.write_text(f'[models]\nbundle = "{bundle}"\n', encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        sdk_ok, sdk_detail = _peer_can_run(args.peer_python)
        runs: dict[str, list[dict[str, Any]]] = {"cxr_ai_batch": [], "monai_deploy_sdk": [], "plain_script": []}
        for r in range(max(1, args.reps)):
            out = tmp / f"cxr-{r}"
            wall, log, rc = _timed([sys.executable, "-m", "cxr_ai", "batch", str(folder), "--out", str(out),
                                    "--no-explain", "--config", str(cfg), "--no-progress"], env=env)
            runs["cxr_ai_batch"].append({"wall_s": round(wall, 3), "img_s": round(n_images / wall, 3), "rc": rc,
                                         "log_tail": log[-400:]})
            if sdk_ok:
                out = tmp / f"sdk-{r}"
                wall, log, rc = _timed([args.peer_python, str(HERE / "peer" / "sdk_app.py"), "--input", str(folder),
                                        "--model", str(ts), "--out", str(out)])
                runs["monai_deploy_sdk"].append({"wall_s": round(wall, 3), "img_s": round(n_images / wall, 3),
                                                 "rc": rc, "log_tail": log[-600:]})
            out = tmp / f"plain-{r}"
            wall, log, rc = _timed([sys.executable, str(HERE / "peer" / "plain_script.py"), "--input", str(folder),
                                    "--model", str(ts), "--out", str(out)])
            runs["plain_script"].append({"wall_s": round(wall, 3), "img_s": round(n_images / wall, 3), "rc": rc,
                                         "log_tail": log[-400:]})
            for name, rs in runs.items():
                if rs:
                    print(f"round {r}: {name:18s} {rs[-1]['img_s']:6.2f} img/s ({rs[-1]['wall_s']:.1f} s, rc {rs[-1]['rc']})",
                          flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def best(name: str) -> dict[str, Any] | None:
        ok = [r for r in runs[name] if r["rc"] == 0]
        return max(ok, key=lambda r: r["img_s"]) if ok else None

    ours = best("cxr_ai_batch")
    result: dict[str, Any] = {
        "benchmark": "cxr-ai batch --no-explain vs peers, same folder and DenseNet-121 weights, start-up included",
        "studies": args.n, "images": n_images, "image_size": args.size, "reps": args.reps,
        "peer_sdk": {"available": sdk_ok, "detail": sdk_detail, "python": args.peer_python},
        **machine_info(),
        "runs": runs,
        "best": {name: best(name) for name in runs},
        "ratio_cxr_ai_over": {},
    }
    for name in ("monai_deploy_sdk", "plain_script"):
        peer = best(name)
        if ours and peer:
            result["ratio_cxr_ai_over"][name] = round(ours["img_s"] / peer["img_s"], 3)
    print(json.dumps({"best": {k: (v or {}).get("img_s") for k, v in result["best"].items()},
                      "ratio_cxr_ai_over": result["ratio_cxr_ai_over"], "peer_sdk": result["peer_sdk"]}, indent=2))
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
