"""Router: assigns each request a variant, binds it to that variant's bundle version, runs the stages
(one hop per group of the placement, or none when the Ingress hosts them: `deployments.group`), and
mirrors a share of requests to a shadow version off the critical path.

It lives inside each Ingress replica (a plain object, not a deployment): a request crosses one Serve
hop fewer, and the router's bookkeeping costs no process of its own (issue 4's latency budget).

Variants and the shadow name registry refs (an alias, followed, or a fixed version); one `AliasWatcher`
per distinct ref. A new version is served only after every group has loaded it (`warm`), so a swap
never fails an in-flight request and a bad bundle is refused while the previous version keeps
serving. Handles are kept per version (model multiplexing): the A/B arms and the shadow serve side by
side in the same deployments. A user's variant is `assign_variant(salt, user_id, weights)`; a variant
without a loaded version is answered by the first one that has one, flagged `model_missing`.

After the response is built (a task, not awaited by the request) the router records the response for
attribution (batched into Redis every few tens of ms) and, when sampled, runs the same query on the
shadow version: overlap, latency and errors go to metrics and to the shadow log. A shadow failure or
timeout never reaches the user; at most `shadow.max_in_flight` mirrors run at once per replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from serve_app.batching import Batcher
from serve_app.chain import FallbackLists, Progress, advance, answer_from_lists, ranker_order
from serve_app.config import BatchOptions, ServeSettings
from serve_app.deployments.group import GroupClient
from serve_app.errors import BadRequest, ModelUnavailable, StageUnavailable
from serve_app.experiments import (
    ExperimentLog,
    Served,
    ShadowComparison,
    VariantCounts,
    assign_variant,
    jaccard,
    rank_biased_overlap,
    shadow_sampled,
)
from serve_app.metrics import ModelMetrics, StageMetrics
from serve_app.models import AliasWatcher, ModelSource, SwapOutcome
from serve_app.placement import STAGES
from serve_app.stages.records import (
    Query,
    Recommendations,
    Scored,
    UserState,
    stamp,
    with_timing,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedVersions:
    """What the event writer needs to build delta embeddings in each variant's item space."""

    variants: dict[str, str | None]
    default: str | None  # the first variant's version, else any loaded one


@dataclass(frozen=True)
class Readiness:
    """What /readyz reports: ready once every stage has loaded a version of at least one variant
    with a positive weight (a variant without one is answered by another, flagged model_missing).
    `model_version` is the first variant's version (the space of the real-time delta embeddings)."""

    ready: bool
    model_version: str | None
    model_uri: str
    last_check: float | None
    error: str | None
    refused: dict[str, str] = field(default_factory=dict)
    variants: dict[str, str | None] = field(default_factory=dict)
    shadow_version: str | None = None


def compare_variants(counts: list[tuple[str, VariantCounts]]) -> list[dict[str, Any]]:
    """CTR of every other variant against the first (the control): difference and its 95% interval
    (Newcombe's hybrid score interval), and whether the interval excludes 0."""
    (control, base), others = counts[0], counts[1:]
    out = []
    for name, treatment in others:
        diff, low, high = base.ctr_difference(treatment)
        out.append(
            {
                "control": control,
                "treatment": name,
                "ctr_difference": diff,
                "ctr_difference_ci95": [low, high],
                "significant": low > 0 or high < 0,
            }
        )
    return out


def root_cause(exc: BaseException) -> BaseException:
    """The exception a remote stage raised (Ray wraps it in a RayTaskError with `.cause`)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def describe(exc: BaseException) -> str:
    cause = root_cause(exc)
    message = getattr(cause, "message", None)
    return str(message) if message else f"{type(cause).__name__}: {cause}"


def is_unavailable(exc: BaseException) -> bool:
    """A dead or unreachable replica (killed, restarting, no replica yet), not an error it raised."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    gone = (
        ActorDiedError,
        ActorUnavailableError,
        RayActorError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )
    return isinstance(exc, gone) or isinstance(root_cause(exc), gone)


@dataclass
class _Arm:
    """A registry ref (alias or version) the router follows, and the variants that use it."""

    ref: str
    watcher: AliasWatcher
    variants: list[str]


class Router:
    """Built by the Ingress replica's constructor (on its event loop): starts its own tasks."""

    def __init__(self, settings: ServeSettings, groups: list[GroupClient]) -> None:
        from serve_app.redis_client import connect_redis

        self._settings = settings
        self._experiment = experiment = settings.experiment
        self._groups = groups
        self._source = ModelSource.from_settings(settings)
        self._weights = experiment.weights
        self._metrics = {v.name: ModelMetrics(v.name) for v in experiment.variants}
        self._graph = StageMetrics("graph")
        # Stage failures the router answered around, counted where they are seen (here).
        self._stage_metrics = {name: StageMetrics(name) for name in STAGES}
        # Each served version's item ids: the ReRanker's fallback names items without it.
        self._item_ids: dict[str, np.ndarray] = {}
        # Each served version's few hundred most popular items: the answer when no stage can give one.
        self._fallback_lists: dict[str, FallbackLists] = {}
        # Groups skipped (dead or late, and which) until their probe gets an answer (`_probe`).
        self._skip: dict[str, str] = {}
        self._arms: dict[str, _Arm] = {}
        self._variant_ref = experiment.variant_refs(settings.models.alias)
        for name, ref in self._variant_ref.items():
            self._arm(ref).variants.append(name)
        shadow = experiment.shadow
        self._shadow_ref = experiment.shadow_ref
        if self._shadow_ref is not None:
            self._arm(self._shadow_ref)
        self._log = ExperimentLog(
            connect_redis(settings.event_redis_url, settings.redis_timeout_seconds),
            experiment.key_prefix,
            experiment.name,
            experiment.attribution_window_seconds,
            shadow.log_max_entries,
        )
        self._served: list[Served] = []
        self._comparisons: list[ShadowComparison] = []
        self._shadow_in_flight = 0
        self._shadow_skipped = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._batch_metrics = StageMetrics("ingress")
        # Requests are grouped before the first hop; mirrored ones in batches of their own, one at a
        # time, off the served requests' path (at most shadow.max_in_flight of them, _maybe_mirror).
        self._batcher: Batcher[Query, Recommendations] = Batcher(
            self._run,
            BatchOptions(),
            on_batch=self._batch_metrics.observe_batch,
            name="router",
        )
        self._shadow_batcher: Batcher[Query, Recommendations] = Batcher(
            self._run, self._shadow_options(BatchOptions()), name="shadow"
        )
        loop = asyncio.get_running_loop()
        # The replica's event loop runs the constructor: these live as long as the replica.
        self._tasks = [loop.create_task(arm.watcher.run()) for arm in self._arms.values()]
        self._tasks.append(
            loop.create_task(self._refresh_metrics(settings.monitoring.sample_interval_seconds))
        )
        self._tasks.append(loop.create_task(self._flush_forever(0.05)))

    async def first_checks(self, timeout: float) -> bool:
        """Wait until every arm's first alias check has finished (its version loaded and warmed in
        every group, or refused, or the registry found unreachable), at most `timeout` seconds.
        The Ingress constructor awaits it: Serve sends a replica no request before its constructor
        returns, so a new or restarted replica does not answer 503 `model_unavailable` while its
        first version loads. False when the wait timed out (the replica then starts anyway)."""
        waits = [arm.watcher.checked.wait() for arm in self._arms.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except TimeoutError:
            logger.warning("first version not loaded within %.0f s: starting without it", timeout)
            return False
        return True

    def _arm(self, ref: str) -> _Arm:
        arm = self._arms.get(ref)
        if arm is None:
            watcher = AliasWatcher(
                resolve=partial(self._source.resolve, ref),
                activate=partial(self._activate, ref),
                interval_seconds=self._settings.models.poll_interval_seconds,
            )
            arm = self._arms[ref] = _Arm(ref, watcher, [])
        return arm

    async def _refresh_metrics(self, interval: float) -> None:
        # Ray forgets gauge values not set for two export intervals: set them again.
        while True:
            for metrics in self._metrics.values():
                metrics.refresh()
            await asyncio.sleep(interval)

    def configure(self, options: BatchOptions, user_config: dict[str, Any] | None = None) -> None:
        """The Ingress's `user_config` batching (the shadow's batches take the same size and wait);
        its ranking overrides reach the stages hosted in the Ingress (`fused`)."""
        for group in self._groups:
            group.configure(user_config)
        self._batcher.configure(options)
        self._shadow_batcher.configure(self._shadow_options(options))

    def _shadow_options(self, options: BatchOptions) -> BatchOptions:
        return options.model_copy(
            update={"max_pending": None, "max_wait_s": None, "max_concurrent_batches": 1}
        )

    async def _activate(self, ref: str, version: str) -> None:
        """Have every replica of every group load and warm `version` before any request names it
        (the old version serves meanwhile). One group at a time: loading competes with serving for
        the node's cores. A bundle a stage cannot load is refused (raise ModelUnavailable); a group
        with no live replica (restarting) defers the swap to the watcher's next check
        (StageUnavailable), so a swap during a replica restart is not refused for good."""
        arm = self._arms[ref]
        timeout = self._settings.models.warm_timeout_seconds
        failures: list[str] = []
        absent: list[str] = []
        # Download and verify it here first, into the bundle cache the stages on this node share:
        # they then load it from the cache instead of each starting a registry process to fetch
        # it (seconds of CPU each, while serving). A stage on another node still fetches its own.
        try:
            await asyncio.wait_for(asyncio.to_thread(self._source.fetch, version), timeout)
        except Exception as exc:  # the stages' own fetch decides, and reports, as before
            logger.warning("prefetch of version %s failed: %s", version, describe(exc))
        for group in self._groups:
            name = group.group.name
            try:
                results = await group.warm(version, timeout)
            except TimeoutError:
                failures.append(f"{name}: not loaded within {timeout:.0f} s")
                continue
            except Exception as exc:
                results = [exc]
            for result in results:
                if isinstance(result, BaseException) and is_unavailable(result):
                    absent.append(name)
                elif isinstance(result, BaseException):
                    failures.append(f"{name}: {describe(result)}")
        if failures:
            for variant in arm.variants:
                self._metrics[variant].refused_version()
            raise ModelUnavailable("; ".join(failures))
        if absent:
            raise StageUnavailable(", ".join(sorted(set(absent))))
        if version not in self._item_ids or version not in self._fallback_lists:
            # From the group holding the re-ranker, which just loaded them: no second fetch and
            # verification here.
            last = self._groups[-1]
            self._item_ids[version] = await asyncio.wait_for(last.item_ids(version), timeout)
            self._fallback_lists[version] = await asyncio.wait_for(
                last.fallback_lists(version), timeout
            )
        in_use = self._versions_in_use() | {version}
        for kept in (self._item_ids, self._fallback_lists):
            for stale in [v for v in kept if v not in in_use]:
                del kept[stale]
        # What a stage replica started from now on loads before its first request.
        serving = {version} | {
            a.watcher.current for r, a in self._arms.items() if r != ref and a.watcher.current
        }
        try:
            self._source.note_serving(serving)
        except OSError as exc:  # only a hint: a stage loads a version on first use without it
            logger.warning("could not record the served versions: %s", exc)
        for variant in arm.variants:
            self._metrics[variant].swapped(arm.watcher.current, version)

    def _versions_in_use(self) -> set[str]:
        return {a.watcher.current for a in self._arms.values() if a.watcher.current is not None}

    def _shadow_version(self) -> str | None:
        return self._arms[self._shadow_ref].watcher.current if self._shadow_ref else None

    def _version_of(self, variant: str) -> str | None:
        return self._arms[self._variant_ref[variant]].watcher.current

    def _choose(self, user_id: str) -> tuple[str, str, bool]:
        """(variant, version, substituted): the user's variant, or the first one with a version."""
        variant = assign_variant(self._experiment.salt, user_id, self._weights)
        version = self._version_of(variant)
        if version is not None:
            return variant, version, False
        for name, weight in self._weights:
            other = self._version_of(name)
            if weight > 0 and other is not None:
                return name, other, True
        errors = self._arm_errors()
        raise ModelUnavailable(
            f"no version of {self._settings.models.model_name} is loaded yet"
            + (f" ({errors})" if errors else "")
        )

    def _arm_errors(self) -> str | None:
        """The last alias-check error of every arm that has one, or None."""
        errors = [
            f"{a.ref}: {a.watcher.last_error}" for a in self._arms.values() if a.watcher.last_error
        ]
        return "; ".join(errors) or None

    async def _run(self, queries: list[Query]) -> list[Recommendations]:
        """One batch through the placement's groups, one hop each (its queries may name different
        versions). A stage that fails or misses its deadline (`deadlines.*`) is answered around,
        flagged degraded, inside its group or here when the whole group is dead, late or failing
        (then every stage it holds is): UserTower -> the user as a cold one; Retriever ->
        popularity lists from the ReRanker, else from the Ingress's own lists; Ranker -> retrieval
        order; ReRanker -> ranker order (`chain.advance`)."""
        progress = Progress(0, list(queries))
        for group in self._groups:
            if not group.group.holds(progress.at):
                continue  # a fallback jumped over it (the retriever's popularity)
            answered = await self._group(group, progress)
            if answered is None:
                answered = await advance(progress, group.group.stages, self._skipped, self)
            progress = answered
        if not progress.done:  # every stage is in some group: cannot happen
            raise StageUnavailable(STAGES[progress.at])
        results: list[Recommendations] = progress.batch
        return results

    async def _skipped(self, name: str, batch: list[Any]) -> None:
        """A stage of a group that did not answer (counted in `_group`): its fallback applies."""
        return None

    def _deadline(self, group: GroupClient, progress: Progress) -> float:
        """The summed deadlines of the group's stages this batch will pass, at most half the
        request's own timeout: a dead group (a killed replica's call hangs until Serve notices)
        must leave the fallbacks time to answer before the request times out."""
        deadlines = self._settings.deadlines
        if progress.popular:
            return deadlines.reranker
        stages = [s for i, s in enumerate(STAGES) if i >= progress.at and s in group.group.stages]
        total = sum(getattr(deadlines, s) for s in stages)
        return min(total, self._settings.api.request_timeout_seconds / 2)

    async def _group(self, group: GroupClient, progress: Progress) -> Progress | None:
        """The group's answer, or None when it failed or missed its deadline (the batch's requests
        counted under every stage the batch would pass there, per cause in
        recserve_stage_errors_total: timeout, unavailable, error). A group that was dead or late
        is skipped (None at once, counted under that cause) until a probe (`ping`, every
        `deadlines.cooldown` seconds) finds it answering: no request waits out a deadline on a
        group known to be down."""
        name = group.group.name
        deadlines = self._settings.deadlines
        requests = len(progress.batch)
        skipped = self._skip.get(name)
        if skipped is not None:
            self._count_failed(group, progress, skipped, requests)
            return None
        response = group.run(progress)
        try:
            return await asyncio.wait_for(response, timeout=self._deadline(group, progress))
        except TimeoutError:
            cancel = getattr(response, "cancel", None)
            if cancel is not None:
                cancel()
            cause = "timeout"
        except Exception as exc:
            if isinstance(root_cause(exc), BadRequest):
                raise  # the request's own fault: no fallback makes it right
            cause = "unavailable" if is_unavailable(exc) else "error"
            logger.warning("group %s failed (%s): %s", name, cause, describe(exc))
        self._count_failed(group, progress, cause, requests)
        if cause != "error" and deadlines.cooldown > 0 and name not in self._skip:
            self._skip[name] = cause
            self._tasks.append(asyncio.get_running_loop().create_task(self._probe(group)))
        return None

    def _count_failed(
        self, group: GroupClient, progress: Progress, cause: str, requests: int
    ) -> None:
        for stage in group.group.stages:
            if STAGES.index(stage) >= progress.at:
                self._stage_metrics[stage].failed(cause, requests)

    async def _probe(self, group: GroupClient) -> None:
        """Ping a skipped group every `deadlines.cooldown` seconds; its first answer ends the skip."""
        name = group.group.name
        deadlines = self._settings.deadlines
        timeout = min(
            sum(getattr(deadlines, s) for s in group.group.stages),
            self._settings.api.request_timeout_seconds / 2,
        )
        try:
            while True:
                await asyncio.sleep(deadlines.cooldown)
                try:
                    if await asyncio.wait_for(group.ping(), timeout):
                        logger.info("group %s answers again", name)
                        return
                except Exception as exc:  # still down: probe again
                    logger.debug("group %s still down: %s", name, describe(exc))
        finally:
            self._skip.pop(name, None)
            task = asyncio.current_task()
            if task in self._tasks:
                self._tasks.remove(task)

    # --- chain.Fallbacks: what the Ingress answers alone ---------------------------------------

    async def popular(self, users: list[UserState]) -> list[Recommendations]:
        """Neither the retriever nor the re-ranker answered: the version's popular items kept here
        (by segment, filters applied), flagged degraded."""
        return answer_from_lists(self._fallback_lists, users)

    async def ranker_order(self, scored: list[Scored]) -> list[Recommendations]:
        """The ReRanker did not answer: the ranker's order, named with the item ids kept here."""
        out = []
        for s in scored:
            item_ids = self._item_ids.get(s.candidates.user.query.model_version)
            if item_ids is None:
                raise StageUnavailable("reranker")
            out.append(ranker_order(s, item_ids))
        return out

    async def recommend(self, query: Query) -> Recommendations:
        """The query's answer, from the batch it joins (Overloaded when too many are waiting)."""
        variant, version, substituted = self._choose(query.user_id)
        start = time.perf_counter()
        result = await self._batcher.submit(stamp(query, version, variant))
        end = time.perf_counter()
        served_ms = (end - start) * 1000.0
        self._graph.observe(served_ms)
        result = replace(result, timings=with_timing(result.timings, "graph", start, end))
        if substituted:  # precedence over cold_start/degraded: the variant itself is missing
            result = replace(result, fallback="model_missing")
        self._served.append(Served(query.request_id, query.user_id, variant, version))
        self._maybe_mirror(query, result, served_ms)
        return result

    # --- shadow ----------------------------------------------------------------------------------

    def _maybe_mirror(self, query: Query, served: Recommendations, served_ms: float) -> None:
        shadow = self._experiment.shadow
        if self._shadow_ref is None:
            return
        if not shadow_sampled(self._experiment.salt, query.request_id, shadow.share):
            return
        if self._shadow_in_flight >= shadow.max_in_flight:
            self._shadow_skipped += 1
            return
        self._spawn(self._mirror(query, served, served_ms))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _mirror(self, query: Query, served: Recommendations, served_ms: float) -> None:
        """Run `query` on the shadow version and compare; never raises."""
        assert self._shadow_ref is not None
        metrics = self._metrics[served.variant]
        version = self._shadow_version()
        self._shadow_in_flight += 1
        start = time.perf_counter()
        error: str | None = None
        shadow: Recommendations | None = None
        try:
            if version is None:
                error = "unavailable"
            else:
                shadow = await asyncio.wait_for(
                    self._shadow_batcher.submit(
                        stamp(replace(query, explain=False), version, served.variant)
                    ),
                    timeout=self._experiment.shadow.timeout_seconds,
                )
        except TimeoutError:
            error = "timeout"
        except Exception as exc:  # the shadow's failure is data, not the user's problem
            error = "error"
            logger.warning("shadow version %s failed: %s", version, describe(exc))
        finally:
            self._shadow_in_flight -= 1
        shadow_ms = (time.perf_counter() - start) * 1000.0
        served_ids = [item.item_id for item in served.items]
        overlap: float | None = None
        rbo: float | None = None
        if shadow is not None:
            shadow_ids = [item.item_id for item in shadow.items]
            overlap = jaccard(served_ids, shadow_ids)
            rbo = rank_biased_overlap(served_ids, shadow_ids)
            metrics.shadow_compared(overlap, rbo, shadow_ms)
        else:
            metrics.shadow_failed(error or "error")
        self._comparisons.append(
            ShadowComparison(
                request_id=query.request_id,
                variant=served.variant,
                served_version=served.model_version,
                shadow_version=version or "",
                k=query.k,
                served_ms=served_ms,
                shadow_ms=shadow_ms if shadow is not None else None,
                jaccard=overlap,
                rbo=rbo,
                error=error,
            )
        )

    # --- the shared record -----------------------------------------------------------------------

    async def _flush_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.flush()

    async def flush(self) -> None:
        """Write the buffered responses (attribution) and shadow comparisons to Redis."""
        served, self._served = self._served, []
        comparisons, self._comparisons = self._comparisons, []
        if not served and not comparisons:
            return
        try:
            await asyncio.to_thread(self._write, served, comparisons)
        except Exception as exc:  # Redis down: attribution pauses, serving goes on
            logger.warning(
                "experiment record unavailable, %d responses not attributed: %s", len(served), exc
            )

    def _write(self, served: list[Served], comparisons: list[ShadowComparison]) -> None:
        if served:
            self._log.served(served)
        if comparisons:
            self._log.log_shadow(comparisons)

    # --- reports ---------------------------------------------------------------------------------

    def served_versions(self) -> ServedVersions:
        """Each variant's loaded version, and the first variant's (else any loaded one)."""
        first = self._experiment.variants[0].name
        variants = {name: self._version_of(name) for name, _ in self._weights}
        default = variants[first] or next((v for v in variants.values() if v is not None), None)
        return ServedVersions(variants, default)

    async def readiness(self) -> Readiness:
        served = self.served_versions()
        variants = served.variants
        ready = any(variants[name] is not None for name, weight in self._weights if weight > 0)
        checks = [a.watcher.last_check for a in self._arms.values() if a.watcher.last_check]
        refused = {v: m for arm in self._arms.values() for v, m in arm.watcher.refused.items()}
        return Readiness(
            ready=ready,
            model_version=served.default,
            model_uri=self._settings.models.uri,
            last_check=max(checks) if checks else None,
            error=self._arm_errors(),
            refused=refused,
            variants=variants,
            shadow_version=self._shadow_version(),
        )

    async def experiments(self) -> dict[str, Any]:
        """GET /v1/experiments: the split, versions, live counts with CTR intervals, the shadow."""
        experiment = self._experiment
        await self.flush()
        total = sum(w for _, w in self._weights) or 1.0
        try:
            counts: dict[str, Any] = await asyncio.to_thread(
                self._log.counts, [name for name, _ in self._weights]
            )
            counts_error = None
        except Exception as exc:
            counts, counts_error = {}, f"counts unavailable: {exc}"
        variants = []
        for v in experiment.variants:
            entry: dict[str, Any] = {
                "name": v.name,
                "model": self._variant_ref[v.name],
                "version": self._version_of(v.name),
                "weight": v.weight,
                "share": v.weight / total,
            }
            if v.name in counts:
                entry["counts"] = counts[v.name].as_dict()
            variants.append(entry)
        shadow = experiment.shadow
        report: dict[str, Any] = {
            "experiment": experiment.name,
            "model": self._settings.models.model_name,
            "attribution_window_seconds": experiment.attribution_window_seconds,
            "variants": variants,
            "shadow": {
                "model": shadow.model,
                "version": self._shadow_version(),
                "share": shadow.share if self._shadow_ref else 0.0,
                "skipped_busy": self._shadow_skipped,
            },
            "error": counts_error,
        }
        if counts and len(variants) >= 2:
            report["comparisons"] = compare_variants(
                [(v.name, counts[v.name]) for v in experiment.variants]
            )
        return report

    async def reload(self) -> SwapOutcome:
        """Re-resolve every ref now (admin), retrying previously refused versions; the outcome of
        the first variant's ref (the others are in /readyz)."""
        outcomes = [await arm.watcher.check(force=True) for arm in self._arms.values()]
        return outcomes[0]

    def __del__(self) -> None:
        for task in getattr(self, "_tasks", []):
            task.cancel()
        for batcher in (getattr(self, "_batcher", None), getattr(self, "_shadow_batcher", None)):
            if batcher is not None:
                batcher.close()
