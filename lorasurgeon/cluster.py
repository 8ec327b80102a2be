"""Running a list of per-step tasks: in this process one after another, or as Ray tasks on a cluster.

A task is a pure, module-level function of one step: the step is plain picklable data that names its inputs
by path and byte range (so it runs on any node that sees the same files), and the task returns a small
picklable result. Nothing else crosses to a worker: no open files, no plan, no writer. The driver gets each
result through `on_result` as it arrives (in completion order on Ray) and does all the writing itself.

Ray is the engine, not a scheduler of ours: each step is one `ray.remote` call with the step's CPUs and GPUs,
retried by Ray when its worker dies (`RETRIES`; our own errors are deterministic and never retried). Ray is an
optional extra (`pip install 'lorasurgeon[ray]'`), imported only when a cluster is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, Literal, TypeVar

from lorasurgeon.errors import LorasurgeonError, Option, UnsupportedError

S = TypeVar("S")
R = TypeVar("R")
RETRIES = 3  # runs of a step after the first when its worker process or node is lost (Ray's max_retries)
LOCAL = "local"


class ClusterError(LorasurgeonError):
    """The cluster could not be reached, or it lost a step more often than it retries."""


@dataclass(frozen=True)
class Cluster:
    """A Ray cluster to run steps on: `address` as `ray.init` takes it (host:port, ray://host:10001, auto);
    None is Ray's own default (RAY_ADDRESS, else a cluster started on this machine, else a new local one)."""

    address: str | None = None

    @property
    def label(self) -> str:
        return f"ray:{self.address}" if self.address else "ray"


def parse_cluster(text: str) -> Cluster:
    """`ray` or `ray:ADDRESS`, as --cluster takes it."""
    engine, _, address = text.partition(":")
    if engine != "ray":
        raise LorasurgeonError(Option("cluster", text), ": expected ray or ray:ADDRESS (the only engine is Ray)")
    return Cluster(address or None)


@dataclass(frozen=True)
class Resources:
    """What one step takes from the node that runs it (Ray's num_cpus and num_gpus)."""

    cpus: float = 1.0
    gpus: float = 0.0


@dataclass(frozen=True)
class NodeWork:
    """The steps one node ran, and the seconds they took there (summed over steps, not wall time)."""

    node: str
    steps: int
    seconds: float


@dataclass(frozen=True)
class WorkReport:
    """Where the steps of a run went: per node, how many were run again after a lost worker, and how many
    were not run at all because an interrupted run had computed them (`resumed`, filled in by the caller)."""

    engine: Literal["local", "ray"]
    address: str | None
    nodes: tuple[NodeWork, ...]
    retried: int = 0
    resumed: int = 0

    @property
    def steps(self) -> int:
        return sum(n.steps for n in self.nodes)


@dataclass(frozen=True)
class Ran(Generic[R]):
    """A step's result with where and how it ran (the node, the attempt: 0 unless Ray retried it)."""

    result: R
    node: str
    attempt: int
    seconds: float


def run_steps(
    task: Callable[[S], R],
    steps: Sequence[S],
    on_result: Callable[[int, R], None],
    *,
    cluster: Cluster | None = None,
    resources: Resources = Resources(),
    name: Callable[[S], str] = str,
) -> WorkReport:
    """Run `task` on every step, here (cluster None) or on Ray, calling `on_result(index, result)` on the
    driver for each as it completes. Raises the task's own LorasurgeonError as it is, ClusterError when Ray
    is unreachable or loses a step RETRIES + 1 times, UnsupportedError when Ray is not installed."""
    if cluster is None:
        tally = _Tally()
        for index, step in enumerate(steps):
            ran = ran_here(task, step)
            tally.add(ran)
            on_result(index, ran.result)
        return tally.report("local", None, {})
    ray = _import_ray(cluster)
    with _connected(ray, cluster):
        return _run_on_ray(ray, task, steps, on_result, cluster, resources, name)


def ran_here(task: Callable[[S], R], step: S) -> Ran[R]:
    """Run one step in this process, timed."""
    started = time.perf_counter()
    result = task(step)
    return Ran(result, LOCAL, 0, time.perf_counter() - started)


def ran_on_worker(task: Callable[[S], R], step: S) -> Ran[R]:
    """Run one step on a Ray worker, and say on which node and in which attempt."""
    import ray

    ran = ran_here(task, step)
    attempt = 0
    with contextlib.suppress(Exception):  # a Ray without this private call: retries go uncounted
        # Ray does not tell the driver that a task was retried; the worker knows its attempt number.
        from ray._private.worker import global_worker

        attempt = int(global_worker.core_worker.get_current_task_attempt_number())  # type: ignore[attr-defined, unused-ignore]
    return Ran(ran.result, ray.get_runtime_context().get_node_id(), attempt, ran.seconds)


class _Tally:
    def __init__(self) -> None:
        self.steps: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.retried = 0

    def add(self, ran: Ran[Any]) -> None:
        self.steps[ran.node] += 1
        self.seconds[ran.node] += ran.seconds
        self.retried += ran.attempt > 0

    def report(self, engine: Literal["local", "ray"], address: str | None, names: dict[str, str]) -> WorkReport:
        nodes = tuple(NodeWork(names.get(n, n), self.steps[n], self.seconds[n]) for n in sorted(self.steps))
        return WorkReport(engine, address, nodes, self.retried)


def _import_ray(cluster: Cluster) -> Any:
    try:
        import ray
    except ImportError:
        raise UnsupportedError(
            Option("cluster", cluster.label), " needs Ray, an optional extra: pip install 'lorasurgeon[ray]'"
        ) from None
    return ray


@contextlib.contextmanager
def _connected(ray: Any, cluster: Cluster) -> Iterator[None]:
    """Connected to the cluster for the block; disconnects only if it connected (a caller's Ray stays). Ray's driver
    prints what the raylets report ("A worker died ...") on sys.stdout, whatever log_to_driver says: while it is
    connected here, sys.stdout is sys.stderr, so that stdout stays the --json document alone."""
    with contextlib.redirect_stdout(sys.stderr):
        if ray.is_initialized():
            yield
            return
        try:
            ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError or ValueError for an unreachable cluster
            raise ClusterError(Option("cluster", cluster.label), f": cannot connect to the Ray cluster ({e})") from None
        try:
            yield
        finally:
            ray.shutdown()


def _run_on_ray(
    ray: Any,
    task: Callable[[S], R],
    steps: Sequence[S],
    on_result: Callable[[int, R], None],
    cluster: Cluster,
    resources: Resources,
    name: Callable[[S], str],
) -> WorkReport:
    resources = _fitted(ray, resources)
    remote = ray.remote(ran_on_worker).options(
        num_cpus=resources.cpus, num_gpus=resources.gpus, max_retries=RETRIES, retry_exceptions=False
    )
    window = _window(ray, resources)  # steps in flight: enough to keep every slot busy, results bounded
    pending: dict[Any, int] = {}
    tally, upcoming = _Tally(), iter(range(len(steps)))
    for index in upcoming:
        pending[remote.remote(task, steps[index])] = index
        if len(pending) >= window:
            break
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(ref)
        ran = _result(ray, ref, cluster, name(steps[index]))
        tally.add(ran)
        on_result(index, ran.result)
        following = next(upcoming, None)
        if following is not None:
            pending[remote.remote(task, steps[following])] = following
    names = {n["NodeID"]: n.get("NodeManagerAddress", n["NodeID"]) for n in ray.nodes()}
    return tally.report("ray", cluster.address, {k: f"{v} ({k[:8]})" for k, v in names.items()})


def _fitted(ray: Any, resources: Resources) -> Resources:
    """`resources` with its CPUs cut to the most any live node has: a step asking for more than that would wait
    for ever. A task still runs the torch threads it carries (its results depend on them, not on Ray's count), on
    fewer cores. Left as asked while no node has CPUs (a head node of 0 CPUs whose autoscaler adds workers)."""
    largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    return replace(resources, cpus=min(resources.cpus, largest)) if largest > 0 else resources


def _window(ray: Any, resources: Resources) -> int:
    total = ray.cluster_resources()
    slots = total.get("GPU", 0) / resources.gpus if resources.gpus else total.get("CPU", 1) / max(resources.cpus, 1)
    return max(2, 2 * int(slots))


def _result(ray: Any, ref: Any, cluster: Cluster, what: str) -> Ran[Any]:
    try:
        return ray.get(ref)  # type: ignore[no-any-return]
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, LorasurgeonError):  # ours: the same sentence as a local run would give
            raise e.cause from None
        raise
    except ray.exceptions.RayError as e:
        raise ClusterError(
            Option("cluster", cluster.label),
            f": the cluster lost the step for {what} {RETRIES + 1} times ({type(e).__name__}); nothing was written",
        ) from None
