"""The stage pools beside the model loop (worker processes or threads), the driver's model
plan, and :func:`run_items`, which processes a chunk of instances (a local run, or one Dask
partition)."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import gc
import hashlib
import json
import logging
import logging.handlers
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_ai.batch.inputs import WorkItem
from cxr_ai.batch.stages import Finished, Prepared, _prepare_or_finish, finish, infer
from cxr_ai.contract import StagedPipeline
from cxr_ai.errors import ConfigError, CxrAiError

logger = logging.getLogger("cxr_ai.batch")  # one logger for the package (sites and tests filter on it)

#: Kinds of stage pool beside the inference loop (``[batch] pool``); "auto" = worker processes
#: when result objects are built, threads for a results-table-only run (see :func:`pool_kind`).
POOL_KINDS: tuple[str, ...] = ("auto", "processes", "threads")
#: ``[batch] start_method``: "auto" = fork on Linux (workers share the driver's loaded pipeline),
#: else spawn (each worker loads the pipeline from the configuration once).
START_METHODS: tuple[str, ...] = ("auto", "fork", "forkserver", "spawn")

MSG_BAD_POOL = '[batch] pool = {value!r} is not one of {known}; use "auto" (default), "processes" or "threads"'
MSG_BAD_START_METHOD = "[batch] start_method = {value!r} is not one of {known}"
MSG_POOL_FALLBACK = "batch worker processes not used ({why}); decoding and result objects run in threads instead"
MSG_WORKER_MODEL = (
    "a batch worker process loaded model {got!r}, not the driver's {want!r}: the driver's pipeline was not "
    "built from its configuration"
)
MSG_WORKER_DIED = (
    "a batch worker process died ({detail}); the instances finished so far are recorded: run the same "
    "command again to resume (if a worker dies again on the same input, --pool threads runs everything "
    "in one process, where the failing instance's error shows)"
)


class BatchWorkerError(CxrAiError):
    """A worker process of the batch stage pool died (killed, out of memory, crashed decoder)."""


def _finish_one(pipeline: StagedPipeline, prepared: Prepared, args: Mapping[str, Any]) -> list[Finished]:
    return [finish(pipeline, prepared, **args)]


class _ThreadStages:
    """Stages 1 and 3 in threads of this process (pydicom's decoders and numpy release the GIL;
    building result objects does not, so it competes with the driver)."""

    kind = "threads"
    maps_in_pool = False  # the model call maps the heatmaps to the source geometry

    def __init__(self, pipeline: StagedPipeline, size: int, *, out_dir: Path, pkey: bytes, write: bool) -> None:
        self.pipeline, self.size = pipeline, size
        self._args = {"out_dir": out_dir, "pkey": pkey, "write": write}
        self._decode = cf.ThreadPoolExecutor(size, thread_name_prefix="cxr-decode")
        self._write = cf.ThreadPoolExecutor(max(1, size // 2), thread_name_prefix="cxr-write")

    def prepare(self, item: WorkItem, ticket: int) -> cf.Future:
        return self._decode.submit(_prepare_or_finish, self.pipeline, item, ticket, **self._args)

    def finish(self, batch: Sequence[Prepared]) -> list[tuple[cf.Future, int]]:
        """Stage 3 of an inferred batch: (future of a list of :class:`~cxr_ai.batch.stages.Finished`, its length)."""
        return [(self._write.submit(_finish_one, self.pipeline, p, self._args), 1) for p in batch]

    def close(self, *, cancel: bool = False) -> None:
        self._decode.shutdown(wait=True, cancel_futures=cancel)
        self._write.shutdown(wait=True, cancel_futures=cancel)


#: State of a batch worker process: its pipeline and the outcomes it keeps until stage 3.
_PROC: dict[str, Any] = {}


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the process that started it ends (a killed batch
    must not leave workers writing outputs nobody records)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        pass


def _proc_init(pipeline: StagedPipeline, config_json: str, explain: bool, log_queue: Any, log_level: int) -> None:
    """Initializer of a worker process: one pipeline per process (inherited or loaded once);
    its log records go to the driver, which hands them to its own handlers."""
    _die_with_parent()
    import torch

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(logging.handlers.QueueHandler(log_queue))
    root.setLevel(log_level)
    torch.set_num_threads(1)  # the pixel pipeline's resize; the model runs in the driver
    _PROC.clear()
    _PROC["pipeline"] = pipeline if pipeline is not None else _worker_pipeline(config_json, explain)
    _PROC["kept"] = {}


def _proc_hello() -> str:
    return str(_PROC["pipeline"].model_info.label)


def _proc_prepare(item: WorkItem, ticket: int, out_dir: Path, pkey: bytes, write: bool) -> Prepared | Finished:
    """Worker: stage 1. The full outcome stays here; the driver gets the model input and a light
    copy (no pixels), so full-resolution images never cross between processes."""
    pipeline = _PROC["pipeline"]
    got = _prepare_or_finish(pipeline, item, ticket, out_dir=out_dir, pkey=pkey, write=write)
    if isinstance(got, Finished):
        return got
    _PROC["kept"][ticket] = got
    return Prepared(item, _light_outcome(got.outcome), got.pre, ticket)


def _proc_finish(done: list[tuple[int, Any, dict[str, float], Any]], heatmaps: bool, out_dir: Path, pkey: bytes,
                 write: bool) -> list[Finished]:
    """Worker: stage 3 for instances of one model batch that this process prepared, given the
    driver's model outputs (``(ticket, result, timings, saliency)``). With ``heatmaps``, the
    maps the driver's forward kept (model geometry, small) are mapped here to the source
    geometry (:meth:`~cxr_ai.pipeline.Pipeline.add_heatmaps`), so that full-resolution maps never cross
    between processes."""
    pipeline = _PROC["pipeline"]
    mine: list[Prepared] = []
    for ticket, result, timings, saliency in done:
        prepared = _PROC["kept"].pop(ticket)
        prepared.outcome.result = result
        prepared.outcome.saliency = saliency
        prepared.outcome.timings.update(timings)
        mine.append(prepared)
    if heatmaps:
        pipeline.add_heatmaps([(p.outcome, p.pre) for p in mine])
    out = []
    for p in mine:
        p.pre = None
        out.append(finish(pipeline, p, out_dir=out_dir, pkey=pkey, write=write))
    return out


def _light_outcome(outcome: Any) -> Any:
    """A copy of ``outcome`` for the driver: the radiograph's metadata without its data set."""
    from pydicom.dataset import Dataset

    from cxr_ai.outputs import ImageOutputs

    rg = outcome.radiograph
    light_rg = dataclasses.replace(rg, dataset=Dataset(), _pixels=None) if rg is not None else None
    return dataclasses.replace(outcome, radiograph=light_rg, outputs=ImageOutputs(),
                               timings=dict(outcome.timings), saliency=None, sc_display=None)


def _worker_config_json(pipeline: StagedPipeline) -> str:
    """The configuration a spawned worker builds its pipeline from: the driver's, on the CPU
    with one thread (workers never run the model)."""
    cfg = json.loads(json.dumps(dict(pipeline.config), default=str))
    models = dict(cfg.get("models", {}) or {})
    bundle = getattr(getattr(pipeline.engine, "bundle", None), "path", None)
    if bundle is not None and not models.get("bundle"):
        models["bundle"] = str(bundle)
    models.update(device="cpu", num_threads=1)
    cfg["models"] = models
    return json.dumps(cfg, sort_keys=True)


def _start_method(value: str) -> str:
    import multiprocessing as mp

    if value not in START_METHODS:
        raise ConfigError(MSG_BAD_START_METHOD.format(value=value, known=START_METHODS))
    available = mp.get_all_start_methods()
    if value == "auto":
        return "fork" if sys.platform.startswith("linux") and "fork" in available else "spawn"
    return value if value in available else "spawn"


def _forward_logs(queue: Any) -> None:
    """Driver thread: each worker log record to the driver's logger of the same name (so the
    driver's handlers, levels and PHI rules apply to what the workers log)."""
    while True:
        try:
            record = queue.get()
        except (EOFError, OSError, ValueError):  # closed, or a killed worker broke the stream
            return
        if record is None:
            return
        logging.getLogger(record.name).handle(record)


class _ProcessStages:
    """Stages 1 and 3 in worker processes, each with its own pipeline, so that reading,
    decoding and building result objects never hold the driver's GIL.

    One single-process executor per worker: stage 3 of an instance runs in the process that
    prepared it, which kept the decoded radiograph (no full-resolution pixels are pickled, no
    file is read twice). A new instance goes to the worker with the fewest tasks in flight.
    """

    kind = "processes"

    def __init__(self, pipeline: StagedPipeline, size: int, *, out_dir: Path, pkey: bytes, write: bool,
                 start_method: str = "auto") -> None:
        import multiprocessing as mp

        self.pipeline, self.size = pipeline, size
        # the forward's maps are mapped to the source geometry in the worker holding the source
        self.maps_in_pool = True
        self.start_method = _start_method(start_method)
        ctx = mp.get_context(self.start_method)
        inherit = pipeline if self.start_method == "fork" else None  # fork: no pickling, no reload
        config_json = "" if inherit is not None else _worker_config_json(pipeline)
        self._args = (out_dir, pkey, write)
        self._pools: list[cf.ProcessPoolExecutor] = []
        self._log_queue = ctx.Queue()
        self._log_queue.cancel_join_thread()  # never wait at exit on a queue a killed worker broke
        self._log_thread = threading.Thread(target=_forward_logs, args=(self._log_queue,),
                                            name="cxr-worker-logs", daemon=True)
        self._log_thread.start()
        if inherit is not None:
            # Objects that exist now go to the permanent generation: the children's garbage
            # collector then never writes to them, so their pages stay shared with this
            # process instead of being copied (most of the CPU a forked worker would spend).
            gc.freeze()
        try:
            for _ in range(size):
                self._pools.append(cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=_proc_init,
                                                          initargs=(inherit, config_json, bool(pipeline.explain),
                                                                    self._log_queue, logging.getLogger().level)))
            labels = [f.result() for f in [p.submit(_proc_hello) for p in self._pools]]
        except BaseException:
            self.close(cancel=True)
            raise
        finally:
            if inherit is not None:
                gc.unfreeze()
        want = str(pipeline.model_info.label)
        if any(label != want for label in labels):
            self.close(cancel=True)
            raise ValueError(MSG_WORKER_MODEL.format(got=next(x for x in labels if x != want), want=want))
        self._inflight: list[list[cf.Future]] = [[] for _ in range(size)]
        self._where: dict[int, int] = {}

    def _least_busy(self) -> int:
        for futs in self._inflight:
            futs[:] = [f for f in futs if not f.done()]
        return min(range(self.size), key=lambda w: len(self._inflight[w]))

    def _submit(self, w: int, fn: Callable[..., Any], *args: Any) -> cf.Future:
        try:
            fut = self._pools[w].submit(fn, *args)
        except cf.BrokenExecutor as exc:
            raise BatchWorkerError(MSG_WORKER_DIED.format(detail=exc)) from exc
        self._inflight[w].append(fut)
        return fut

    def prepare(self, item: WorkItem, ticket: int) -> cf.Future:
        w = self._least_busy()
        self._where[ticket] = w
        return self._submit(w, _proc_prepare, item, ticket, *self._args)

    def finish(self, batch: Sequence[Prepared], *, heatmaps: bool = False) -> list[tuple[cf.Future, int]]:
        """Stage 3 of an inferred batch, one task per worker holding some of it."""
        by_worker: dict[int, list[tuple[int, Any, dict[str, float]]]] = {}
        for p in batch:
            by_worker.setdefault(self._where.pop(p.ticket), []).append(
                (p.ticket, p.outcome.result, dict(p.outcome.timings), p.outcome.saliency))
        return [(self._submit(w, _proc_finish, done, heatmaps, *self._args), len(done))
                for w, done in by_worker.items()]

    def close(self, *, cancel: bool = False) -> None:
        for p in self._pools:
            p.shutdown(wait=True, cancel_futures=cancel)
        self._log_queue.put(None)  # after the workers exited: their last records come first
        self._log_thread.join(timeout=10)
        self._log_queue.close()


def _processes_unavailable() -> str:
    """Why worker processes cannot be started here ("" when they can)."""
    import multiprocessing as mp

    if mp.current_process().daemon:
        return "this is a daemonic process (e.g. a Dask worker), which may not start children"
    return ""


def pool_kind(value: str, *, write: bool) -> str:
    """``[batch] pool`` resolved: "auto" is "processes" when result objects are built (building
    them is Python that holds the GIL, as is Grad-CAM's bookkeeping: in threads they stall the
    model loop) and "threads" for a results-table-only run, whose read / decode / preprocess
    mostly release the GIL and then need no inter-process traffic (measured on 2 cores, see
    ``benchmarks/results/batch.json``)."""
    if value not in POOL_KINDS:
        raise ConfigError(MSG_BAD_POOL.format(value=value, known=POOL_KINDS))
    if value == "auto":
        return "processes" if write else "threads"
    return value


def _stage_pool(pipeline: StagedPipeline, kind: str, size: int, *, out_dir: Path, pkey: bytes, write: bool,
                start_method: str) -> _ThreadStages | _ProcessStages:
    kind = pool_kind(kind, write=write)
    if kind == "processes":
        why = _processes_unavailable()
        if not why:
            try:
                return _ProcessStages(pipeline, size, out_dir=out_dir, pkey=pkey, write=write,
                                      start_method=start_method)
            except (OSError, ValueError, TypeError, AttributeError, ImportError, RuntimeError,
                    cf.BrokenExecutor) as exc:
                # e.g. no /dev/shm, a pipeline that cannot be pickled (spawn), a custom engine
                why = f"{type(exc).__name__}: {exc}"
        logger.info(MSG_POOL_FALLBACK.format(why=why))
    return _ThreadStages(pipeline, size, out_dir=out_dir, pkey=pkey, write=write)


def _batch_settings(pipeline: StagedPipeline) -> Mapping[str, Any]:
    cfg = pipeline.config
    return batch_section(cfg) if isinstance(cfg, Mapping) else {}


@dataclass(frozen=True)
class ModelPlan:
    """How the driver runs the model: ``lanes`` batches at once, each call with ``torch_threads``
    intra-op threads (None: leave PyTorch's setting alone)."""

    lanes: int
    torch_threads: int | None


def model_plan(pipeline: StagedPipeline, *, config: Mapping[str, Any] | None = None) -> ModelPlan:
    """The driver's model plan from ``[batch] model_lanes`` / ``torch_threads`` (0 = automatic)
    of ``config`` (default: the pipeline's).

    Automatic, on the CPU with ``[models] num_threads = 0``: one lane per core, one thread each.
    A forward with one thread spends the fewest CPU seconds per image, and single-threaded
    lanes share the cores with the stage pool without the model's threads spinning at their
    barriers while a worker holds a core; the engine's ``predict`` is thread-safe (Grad-CAM
    takes its own lock). With an explicit ``[models] num_threads``, or on a GPU: one lane and
    the engine's threads.
    """
    settings = batch_section(config) if config is not None else _batch_settings(pipeline)
    lanes = int(settings.get("model_lanes", 0) or 0)
    threads = int(settings.get("torch_threads", 0) or 0)
    engine = pipeline.engine
    on_cpu = getattr(getattr(engine, "device", None), "type", "cpu") == "cpu"
    models = (pipeline.config or {}).get("models", {}) or {}
    automatic = on_cpu and int(models.get("num_threads", 0) or 0) <= 0
    if threads <= 0:
        threads = 1 if automatic else 0
    if lanes <= 0:
        lanes = max(1, usable_cores() // max(1, threads)) if automatic else 1
    return ModelPlan(lanes=lanes, torch_threads=threads if on_cpu and threads > 0 else None)


def _settle_torch_threads() -> None:
    """Let PyTorch rebuild its thread pool once, in this thread, before stage threads start.

    In a process forked from one that had set PyTorch's thread count, the first torch call of
    each new thread re-applies that count and rebuilds the pool inherited through the fork; two
    stage threads doing it at once can race ("Invalid thread pool"). One call here, before any
    thread exists, does the rebuild alone.
    """
    import torch

    torch.set_num_threads(torch.get_num_threads())


def run_items(
    pipeline: StagedPipeline,
    items: Sequence[WorkItem],
    *,
    out_dir: Path,
    pkey: bytes,
    threads: int = 2,
    batch_size: int | None = None,
    on_finished: Callable[[Finished], None] | None = None,
    write: bool = True,
    pool: str | None = None,
    start_method: str | None = None,
    plan: ModelPlan | None = None,
) -> list[Finished]:
    """Process ``items``: a stage pool prepares and finishes instances; model lanes (threads of
    this process) run the model on batches in between.

    Parameters
    ----------
    pipeline
        A :class:`cxr_ai.pipeline.Pipeline`; the model runs in this process.
    threads
        Size of the stage pool (worker processes or threads).
    pool
        ``"processes"``: stage 1 (read, gate, decode, preprocess) and stage 3 (Grad-CAM on the
        CPU, result objects, write, table row) in worker processes, each holding a pipeline
        (inherited by fork, or loaded once), so that they run beside the model without its GIL;
        only the model input and the model outputs cross between processes. Falls back to
        threads, with a log line, where processes cannot start (inside a daemonic Dask worker,
        say). ``"threads"``: both stages in threads of this process. ``"auto"``: see
        :func:`pool_kind`. None: ``[batch] pool`` of the pipeline's config.
    start_method
        How worker processes start (see :data:`START_METHODS`); None: ``[batch] start_method``.
    plan
        Model lanes and threads (restored after the run); None: :func:`model_plan`.
    write
        False: results table only (no result object built or written).

    Batches are made in the order of ``items`` (the same batches whatever the pools), so the
    results do not depend on timing. ``on_finished`` is called in this thread, in completion
    order, as each instance is done (the caller records it). Returns everything finished, in
    the order of ``items``. Memory stays bounded: at most about ``max(2 x batch, 2 x pool)``
    instances are prepared ahead of the model, ``lanes x batch`` are in the model and
    ``2 x batch`` wait for their result objects.
    """
    if not items:
        return []
    settings = _batch_settings(pipeline)
    kind = str(pool or settings.get("pool", "auto") or "auto")
    method = str(start_method or settings.get("start_method", "auto") or "auto")
    plan = plan or model_plan(pipeline)
    bs = int(batch_size or getattr(pipeline.engine, "batch_size", 8) or 8)
    size = max(1, int(threads))
    _settle_torch_threads()  # before any stage or model thread exists
    stages = _stage_pool(pipeline, kind, size, out_dir=out_dir, pkey=pkey, write=write, start_method=method)
    logger.info("batch: %d instances, model batches of %d in %d lane(s)%s, stages in %d %s", len(items), bs,
                plan.lanes, f" of {plan.torch_threads} thread(s)" if plan.torch_threads else "", size, stages.kind)
    restore = _set_torch_threads(plan.torch_threads)
    lanes = cf.ThreadPoolExecutor(plan.lanes, thread_name_prefix="cxr-model")
    # Heatmaps are made only when result objects are, always from the driver's forward; they
    # are mapped to the source geometry in the worker processes when there are some (only the
    # small model-geometry maps cross), else in the driver's model call.
    explain = bool(pipeline.explain) and write
    flow = _Flow(pipeline, stages, lanes, n_lanes=plan.lanes, batch_size=bs, explain=explain,
                 heatmaps_in_pool=explain and stages.maps_in_pool, on_finished=on_finished)
    ok = False
    try:
        flow.run(items, lookahead=max(2 * bs, 2 * size))
        ok = True
    finally:
        lanes.shutdown(wait=True, cancel_futures=not ok)
        stages.close(cancel=not ok)
        _set_torch_threads(restore)
    return [flow.results[i.key] for i in items if i.key in flow.results]


def _set_torch_threads(n: int | None) -> int | None:
    """Set PyTorch's thread count to ``n`` (nothing when ``n`` is None or 0); return the count before."""
    if not n:
        return None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    return before


class _Flow:
    """The instances' way through :func:`run_items`: stage 1 in the pool, model batches in
    the lanes (in the order of the items), stage 3 in the pool, each finished instance
    delivered to ``on_finished`` in this thread."""

    def __init__(self, pipeline: StagedPipeline, stages: Any, lanes: cf.ThreadPoolExecutor, *, n_lanes: int,
                 batch_size: int, explain: bool, heatmaps_in_pool: bool,
                 on_finished: Callable[[Finished], None] | None) -> None:
        self.pipeline, self.stages, self.lanes, self.n_lanes = pipeline, stages, lanes, n_lanes
        self.bs, self.explain, self.heatmaps_in_pool = batch_size, explain, heatmaps_in_pool
        self.on_finished = on_finished
        self.results: dict[str, Finished] = {}
        self.pending: deque[tuple[cf.Future, int]] = deque()  # stage 3 tasks in submission order, instances
        self.waiting = 0  # instances in stage 3
        self.inferring: deque[tuple[cf.Future, list[Prepared]]] = deque()  # model calls, in batch order

    def run(self, items: Sequence[WorkItem], *, lookahead: int) -> None:
        it = iter(enumerate(items))
        queue: deque[cf.Future] = deque()
        for ticket, item in it:
            queue.append(self.stages.prepare(item, ticket))
            if len(queue) >= lookahead:
                break
        batch: list[Prepared] = []
        while queue:
            got = _result(queue.popleft())
            nxt = next(it, None)
            if nxt is not None:
                queue.append(self.stages.prepare(nxt[1], nxt[0]))
            if isinstance(got, Finished):  # not applicable / failed: finished by the pool
                self.deliver(got)
            else:
                batch.append(got)
            if batch and (len(batch) >= self.bs or not queue):
                self.harvest(block_until=self.n_lanes - 1)  # a free lane
                self.inferring.append((self.lanes.submit(infer, self.pipeline, batch, explain=self.explain,
                                                         source_maps=not self.heatmaps_in_pool), batch))
                batch = []
            self.harvest(block_until=self.n_lanes)
            self.drain(block_until=2 * self.bs)  # bounded memory: prepared outcomes wait for their outputs
        self.harvest(block_until=0)
        self.drain(block_until=0)

    def deliver(self, fin: Finished) -> None:
        self.results[fin.key] = fin
        if self.on_finished is not None:
            self.on_finished(fin)

    def drain(self, block_until: int) -> None:
        """Deliver finished instances; wait while more than ``block_until`` are in stage 3."""
        while self.pending and (self.waiting > block_until or self.pending[0][0].done()):
            fut, n = self.pending.popleft()
            self.waiting -= n
            for fin in _result(fut):
                self.deliver(fin)

    def harvest(self, block_until: int) -> None:
        """Hand inferred batches (oldest first) to stage 3."""
        while self.inferring and (len(self.inferring) > block_until or self.inferring[0][0].done()):
            fut, done = self.inferring.popleft()
            fut.result()
            tasks = self.stages.finish(done, heatmaps=True) if self.heatmaps_in_pool else self.stages.finish(done)
            self.pending.extend(tasks)
            self.waiting += sum(n for _, n in tasks)


def _result(fut: cf.Future) -> Any:
    try:
        return fut.result()
    except cf.BrokenExecutor as exc:
        raise BatchWorkerError(MSG_WORKER_DIED.format(detail=exc)) from exc


# --- shared with the Dask workers (cxr_ai.batch.run) and the run -------------------------------

_WORKER_PIPELINES: dict[str, Any] = {}
_WORKER_LOCK = threading.Lock()


def _worker_pipeline(config_json: str, explain: bool) -> StagedPipeline:
    """The pipeline of this process for this configuration, loaded once and kept."""
    key = hashlib.sha256(f"{config_json}|{explain}".encode()).hexdigest()
    with _WORKER_LOCK:
        if key not in _WORKER_PIPELINES:
            from cxr_ai.pipeline import Pipeline

            _WORKER_PIPELINES[key] = Pipeline(config=json.loads(config_json), explain=explain)
        return _WORKER_PIPELINES[key]


def batch_section(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config.get("batch", {}) if isinstance(config.get("batch", {}), Mapping) else {}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
