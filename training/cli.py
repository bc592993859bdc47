"""`recserve` command line: generate data, train and register a bundle, promote or roll back.

Thin: parses flags into `TrainingSettings` and calls the pipeline and registry functions.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.logging import RichHandler

from training.config import SIZES, OnlineGateConfig, TrainingSettings, load_settings
from training.data import Dataset, read_dataset, write_dataset
from training.job_metrics import (
    MaterializationMetrics,
    TrainingMetrics,
    add_metrics_arguments,
    metrics_output,
)

if TYPE_CHECKING:
    from training.pipeline import PipelineResult

# Wide enough for the metrics table even when stdout is a pipe or a CI log.
console = Console(width=160) if not Console().is_terminal else Console()


def _settings(args: argparse.Namespace) -> TrainingSettings:
    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "dataset", None):
        overrides["dataset"] = args.dataset
    if getattr(args, "dataset_path", None):
        overrides["dataset_path"] = args.dataset_path
    if getattr(args, "redis_url", None):
        overrides["redis_url"] = args.redis_url
    if getattr(args, "tracking_uri", None):
        overrides["mlflow_tracking_uri"] = args.tracking_uri
    if getattr(args, "no_register", False):
        overrides["register_bundle"] = False
    for name, value in _pins(getattr(args, "set", None) or []).items():
        section, key = name.split(".", 1)
        overrides.setdefault(section, {})[key] = value
    if getattr(args, "budget", None) is not None:
        overrides.setdefault("search", {})["budget_seconds"] = args.budget
    settings = load_settings(args.config, **overrides)
    size = getattr(args, "size", None)
    if size:
        settings.synthetic = settings.synthetic.model_copy(update=SIZES[size])
    if getattr(args, "epochs", None):
        settings.two_tower = settings.two_tower.model_copy(update={"epochs": args.epochs})
    return settings


def _pins(pairs: list[str]) -> dict[str, Any]:
    """`--set section.field=value` flags (values parsed as YAML: 6, 0.5, true, tail)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or "." not in name:
            raise SystemExit(f"--set {pair!r}: expected section.field=value")
        out[name.strip()] = yaml.safe_load(value)
    return out


def load_dataset(settings: TrainingSettings, progress: bool = True) -> Dataset:
    """The data set named by settings; generated data is written under data_dir/datasets."""
    if settings.dataset == "synthetic":
        from training.synthetic import generate

        dataset = generate(settings.synthetic, progress=progress)
        write_dataset(dataset, settings.data_dir / "datasets" / dataset.name)
        return dataset
    if settings.dataset_path is None:
        raise SystemExit(f"--dataset {settings.dataset} needs --dataset-path")
    if settings.dataset == "movielens":
        from training.movielens import load_movielens

        return load_movielens(settings.dataset_path)
    if settings.dataset == "online-retail":
        from training.online_retail import load_online_retail

        dataset, _report = load_online_retail(settings.dataset_path)
        return dataset
    return read_dataset(settings.dataset_path)


def cmd_generate(args: argparse.Namespace) -> int:
    from training.synthetic import generate

    settings = _settings(args)
    dataset = generate(settings.synthetic)
    out = args.out or settings.data_dir / "datasets" / dataset.name
    paths = write_dataset(dataset, out)
    console.print(f"wrote {len(dataset.events):,} events, {len(dataset.catalog):,} items to {out}")
    for name, path in paths.items():
        console.print(f"  {name}: {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.evaluate import print_metrics_table
    from training.pipeline import FINAL_SYSTEM, peak_rss_mb, run_pipeline

    settings = _settings(args)
    started = time.perf_counter()
    dataset = load_dataset(settings)
    loaded = round(time.perf_counter() - started, 3)
    console.print(
        f"data set [bold]{dataset.name}[/]: {len(dataset.events):,} events, "
        f"{dataset.events['user_id'].nunique():,} users, {len(dataset.catalog):,} items"
    )
    load_phase = {"data": {"seconds": loaded, "peak_rss_mb": peak_rss_mb()}}
    budget = settings.search.budget_seconds
    console.print(
        f"choosing settings on the validation round for up to {budget:.0f} s"
        if budget > 0
        else "no settings search (budget 0): the settings as given"
    )
    result = run_pipeline(
        settings,
        dataset,
        on_table=lambda m: print_metrics_table(
            m,
            "Offline evaluation (test round: each user's newest 20% held out; recserve = the "
            "chosen settings, served)",
            console,
        ),
        on_basket_table=lambda m: print_metrics_table(
            m,
            "Offline evaluation (within-order round: the first half of each user's first held-out"
            " order arrives before the request, the rest is relevant)",
            console,
        ),
        on_trial=lambda line: console.print(f"  search: {line}"),
    )
    if result.search is not None and result.search.trials:
        search = result.search
        console.print(
            f"search: {len(search.trials)} trials in {search.seconds:.0f} s; validation NDCG@10 "
            f"{search.given_ndcg10:.4f} (settings as given) -> {search.best_ndcg10:.4f} (chosen)"
        )
        if search.kept_given:
            console.print(
                f"  kept the settings as given: trial {search.best_trial} led by "
                f"{search.gain:+.4f}, standard error {search.gain_se:.4f} of the per-user "
                "difference (search.min_gain_z)"
            )
        console.print(f"  chosen: {search.chosen}")
        console.print(f"  pinned (not searched): {search.pinned or 'none'}")
    console.print("registered bundle: refit on the whole log with the chosen settings")
    console.print(f"index recall@100 vs exact: {result.index_report['recall@100']:.4f}")
    console.print(f"timings (s): {result.timings}  total {sum(result.timings.values()):.1f}")
    console.print(f"bundle: {result.bundle_dir}")
    if result.registered:
        console.print(
            f"registered [bold]{settings.model_name}[/] version {result.registered.version} "
            f"(alias challenger) at {settings.tracking_uri}"
        )
    final = result.metrics[FINAL_SYSTEM]
    console.print(
        f"{FINAL_SYSTEM}: ndcg@10 {final['ndcg@10']:.4f}, recall@50 {final['recall@50']:.4f}"
    )
    _publish_training_metrics(
        args, result.timings, final, result.registered.version if result.registered else None
    )
    promoted = None
    if args.promote and result.registered:
        # Not winning the promotion gate is an outcome, not a failure of the training run.
        # The version just registered has served no traffic: the A/B counts belong to others.
        code = _promote(settings, force=False, version=result.registered.version, online=False)
        promoted = code == 0
    phases_json = getattr(args, "phases_json", None)  # `recserve demo` has no such flag
    if phases_json:
        write_phases_json(phases_json, result, load_phase, promoted)
        console.print(f"phases: {phases_json}")
    return 0


def write_phases_json(
    path: Path,
    result: PipelineResult,
    load_phase: dict[str, dict[str, float]],
    promoted: bool | None,
) -> None:
    """What one `recserve train` run measured, for bench/scale.py: per phase its seconds and the
    process's peak RSS when it ended (data loading first), the bundle, and the test round's table
    (non-finite figures as null)."""
    import json
    import math

    phases = dict(load_phase)
    for name, seconds in result.timings.items():
        phases[name] = {"seconds": seconds, "peak_rss_mb": result.peak_rss_mb[name]}
    document = {
        "phases": phases,
        "seconds": round(sum(p["seconds"] for p in phases.values()), 3),
        "peak_rss_mb": max(p["peak_rss_mb"] for p in phases.values()),
        "bundle_dir": str(result.bundle_dir),
        "registered_version": result.registered.version if result.registered else None,
        "promoted": promoted,
        "index": result.manifest.index.model_dump(),
        "metrics": {
            system: {k: (v if math.isfinite(v) else None) for k, v in values.items()}
            for system, values in result.metrics.items()
        },
        "basket_metrics": {
            system: {k: (v if math.isfinite(v) else None) for k, v in values.items()}
            for system, values in result.basket_metrics.items()
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def _publish_training_metrics(
    args: argparse.Namespace,
    timings: dict[str, float],
    final: dict[str, float],
    version: str | None,
) -> None:
    registry = CollectorRegistry()
    TrainingMetrics(registry).succeeded(timings, final, version, time.time())
    metrics_output(args, job="recserve-training").publish(registry)


def _promote(
    settings: TrainingSettings, force: bool, version: str | None, online: bool = True
) -> int:
    from training.online_gate import OnlineEvidence, print_online_evidence, read_online_evidence
    from training.registry import promote

    evidence = (
        read_online_evidence(settings.redis_url, settings.online_gate)
        if online
        else OnlineEvidence.none(settings.online_gate, "a version trained just now has no traffic")
    )
    decision = promote(
        tracking_uri=settings.tracking_uri,
        model_name=settings.model_name,
        margin=settings.promotion_margin,
        force=force,
        version=version,
        online=evidence,
    )
    for line in decision.evidence:
        console.print(f"  {line}")
    print_online_evidence(evidence, console)
    console.print(
        ("[green]promoted[/] " if decision.promoted else "[yellow]not promoted[/] ")
        + decision.reason
    )
    return 0 if decision.promoted else 3


def _with_online_options(settings: TrainingSettings, args: argparse.Namespace) -> None:
    """Flags of the online gate over the settings' `online_gate` section (validated again)."""
    flags = {
        "experiment": args.experiment,
        "key_prefix": args.key_prefix,
        "control": args.control,
        "treatment": args.treatment,
        "min_impressions": args.min_impressions,
    }
    given = {key: value for key, value in flags.items() if value is not None}
    settings.online_gate = type(settings.online_gate).model_validate(
        {**settings.online_gate.model_dump(), **given}
    )


def cmd_promote(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.margin is not None:
        settings.promotion_margin = args.margin
    _with_online_options(settings, args)
    return _promote(settings, args.force, args.version)


def cmd_rollback(args: argparse.Namespace) -> int:
    from training.online_gate import print_online_evidence, read_online_evidence
    from training.registry import rollback

    settings = _settings(args)
    _with_online_options(settings, args)
    evidence = read_online_evidence(settings.redis_url, settings.online_gate)
    decision = rollback(
        tracking_uri=settings.tracking_uri, model_name=settings.model_name, online=evidence
    )
    for line in decision.evidence:
        console.print(f"  {line}")
    print_online_evidence(evidence, console)
    console.print(decision.reason)
    return 0


def cmd_pin_manifest(args: argparse.Namespace) -> int:
    from training.registry import RegistryError, pin_manifest

    settings = _settings(args)
    try:
        digest = pin_manifest(settings.tracking_uri, settings.model_name, args.version)
    except RegistryError as exc:
        console.print(f"[red]not pinned:[/] {exc}")
        return 1
    console.print(f"{settings.model_name} v{args.version}: recserve.manifest_sha256 = {digest}")
    return 0


def add_online_arguments(p: argparse.ArgumentParser) -> None:
    """Where the online A/B evidence is read (defaults: TrainingSettings.online_gate)."""
    defaults = OnlineGateConfig()
    p.add_argument(
        "--redis-url", help="Redis holding the A/B record (default: REDIS_URL; none: no evidence)"
    )
    p.add_argument("--experiment", help=f"serving experiment name (default: {defaults.experiment})")
    p.add_argument("--key-prefix", help=f"its Redis key prefix (default: {defaults.key_prefix})")
    p.add_argument("--control", help=f"variant serving the champion (default: {defaults.control})")
    p.add_argument(
        "--treatment", help=f"variant serving the candidate (default: {defaults.treatment})"
    )
    p.add_argument(
        "--min-impressions",
        type=int,
        help="served lists per variant before the online gate applies "
        f"(default: {defaults.min_impressions})",
    )


def cmd_features(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from feature_repo.store import apply, materialize_incremental

    settings = _settings(args)
    config = settings.feature_store
    if args.action in ("apply", "all"):
        apply(config)
        console.print(f"feast apply: project {config.project} ({config.resolved_profile} profile)")
    if args.action in ("materialize", "all"):
        end = datetime.now(UTC)
        started = time.monotonic()
        materialize_incremental(config, end=end)
        console.print(f"feast materialize-incremental up to {end.isoformat()}")
        registry = CollectorRegistry()
        MaterializationMetrics(registry).succeeded(
            time.monotonic() - started, end.timestamp(), time.time()
        )
        metrics_output(args, job="recserve-materialization").publish(registry)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate, train, register and promote, then hand over to the serving CLI (features + serve).

    Serving runs in its own process (`python -m serve_app.cli demo`): training never imports the
    serving graph. It applies and materializes the features, serves, answers one request and one
    event, prints curl commands and stops on Ctrl-C.
    """
    import signal
    import subprocess

    args.promote = True
    code = cmd_train(args)
    if code:
        return code
    settings = _settings(args)
    serve = [sys.executable, "-m", "serve_app.cli", "demo", "--data-dir", str(settings.data_dir)]
    if getattr(args, "tracking_uri", None):
        serve += ["--tracking-uri", args.tracking_uri]
    if args.port:
        serve += ["--port", str(args.port)]
    # Not subprocess.call: on Ctrl-C it kills the child, which then cannot stop Serve and Ray (an
    # orphaned HAProxy would keep the port). Pass the interrupt on and wait for the shutdown instead.
    process = subprocess.Popen(serve)
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Replay simulated users against two registered versions through the serving pipeline."""
    from serve_app.config import RankingConfig
    from serve_app.errors import RecserveError
    from serve_app.models import ModelSource
    from serve_app.recommend import limit_threads
    from training.simulate import (
        SimulationError,
        generated_dataset,
        load_variant,
        print_report,
        simulate,
        write_report_json,
    )

    settings = _settings(args)
    limit_threads()  # as one serving replica: results and timing do not depend on the host's cores
    source = ModelSource(
        tracking_uri=settings.tracking_uri,
        model_name=settings.model_name,
        alias=args.champion,
        cache_dir=settings.data_dir / "bundle_cache",
    )
    try:
        champion = load_variant(source, args.champion)
        challenger = (
            champion
            if source.resolve(args.challenger) == champion.version
            else load_variant(source, args.challenger)
        )
        dataset = generated_dataset([champion, challenger], settings, args.dataset_dir)
    except (RecserveError, SimulationError) as exc:
        console.print(f"[red]cannot simulate:[/] {getattr(exc, 'message', None) or exc}")
        return 2
    console.print(
        f"champion v{champion.version} ({args.champion}) vs challenger v{challenger.version} "
        f"({args.challenger}) on {dataset.name}"
    )
    report = simulate(
        champion,
        challenger,
        dataset,
        RankingConfig(),
        runs=args.runs,
        users=args.users,
        k=args.k,
        seed=args.seed,
        bootstrap=args.bootstrap,
    )
    print_report(report, console)
    if args.json:
        console.print(f"written {write_report_json(report, args.json)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recserve",
        description="recserve: train, evaluate, register and promote recommendation bundles.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="YAML settings file (env: RECSERVE_CONFIG)")
        p.add_argument(
            "--data-dir", type=Path, help="data, bundles and local MLflow (default: data)"
        )
        p.add_argument(
            "--tracking-uri", help="MLflow tracking URI (default: sqlite under data dir)"
        )

    g = sub.add_parser("generate", help="write a synthetic data set with planted structure")
    common(g)
    g.add_argument("--size", choices=sorted(SIZES), help="named size (default: settings)")
    g.add_argument("--out", type=Path, help="output directory")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="run the offline pipeline and register a bundle as challenger")
    common(t)
    t.add_argument(
        "--dataset",
        choices=["synthetic", "movielens", "online-retail", "parquet"],
        help="input kind",
    )
    t.add_argument(
        "--dataset-path", type=Path, help="input path for movielens/online-retail/parquet"
    )
    t.add_argument("--size", choices=sorted(SIZES), help="size of the generated data set")
    t.add_argument("--epochs", type=int, help="two-tower epochs (upper bound; early stopping)")
    t.add_argument("--no-register", action="store_true", help="do not register in MLflow")
    t.add_argument(
        "--budget",
        type=float,
        help="seconds of settings search on the validation round (0: none; default "
        "search.budget_seconds, 150)",
    )
    t.add_argument(
        "--set",
        action="append",
        metavar="SECTION.FIELD=VALUE",
        help="pin a setting (not searched), e.g. --set ranker.max_depth=6; repeatable",
    )
    t.add_argument("--promote", action="store_true", help="promote to champion if it wins")
    t.add_argument(
        "--phases-json",
        type=Path,
        help="also write each phase's seconds and peak RSS, the bundle and the test table as JSON "
        "(read by bench/scale.py)",
    )
    add_metrics_arguments(t)
    t.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "promote",
        help="move alias champion to the challenger if it wins offline and is not significantly "
        "worse online (A/B CTR, when both variants have enough impressions)",
    )
    common(p)
    p.add_argument("--margin", type=float, help="relative NDCG@10 gain required (default 0.02)")
    p.add_argument(
        "--force", action="store_true", help="promote regardless of offline and online metrics"
    )
    p.add_argument("--version", help="promote this version instead of the challenger")
    add_online_arguments(p)
    p.set_defaults(func=cmd_promote)

    d = sub.add_parser(
        "demo", help="train on generated data, register, promote, then serve and answer a request"
    )
    common(d)
    d.add_argument("--size", choices=sorted(SIZES), help="size of the generated data set")
    d.add_argument("--epochs", type=int, help="two-tower epochs (upper bound; early stopping)")
    d.add_argument("--port", type=int, help="HTTP port of the served graph (default 8000)")
    add_metrics_arguments(d)
    d.set_defaults(func=cmd_demo, no_register=False, dataset=None, dataset_path=None)

    f = sub.add_parser("features", help="feast apply and/or incremental materialization")
    common(f)
    f.add_argument("action", choices=["apply", "materialize", "all"], help="what to run")
    add_metrics_arguments(f)
    f.set_defaults(func=cmd_features)

    s = sub.add_parser(
        "simulate",
        help="offline A/B: two registered versions served to simulated users of the generated "
        "data set, clicked by its planted click model",
    )
    common(s)
    s.add_argument(
        "--champion", default="champion", help="alias or version number (default: champion)"
    )
    s.add_argument(
        "--challenger", default="challenger", help="alias or version number (default: challenger)"
    )
    s.add_argument(
        "--runs", type=int, default=5, help="independent runs, own seed each (default 5)"
    )
    s.add_argument("--users", type=int, default=1000, help="users sampled per run (default 1000)")
    s.add_argument("--k", type=int, default=10, help="list length shown to each user (default 10)")
    s.add_argument("--seed", type=int, default=0, help="seed of user samples and clicks")
    s.add_argument(
        "--bootstrap", type=int, default=2000, help="paired bootstrap resamples (default 2000)"
    )
    s.add_argument(
        "--size", choices=sorted(SIZES), help="generated data size, if it must be regenerated"
    )
    s.add_argument(
        "--dataset-dir",
        type=Path,
        help="the generated data set with truth (default: data_dir/datasets/<manifest name>)",
    )
    s.add_argument("--json", type=Path, help="write the report as JSON to this path")
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("rollback", help="move alias champion back to the previous champion")
    common(r)
    add_online_arguments(r)
    r.set_defaults(func=cmd_rollback)

    m = sub.add_parser(
        "pin-manifest",
        help="tag a version registered before manifest digests were recorded with its manifest's "
        "sha256 (after checking its files), so serving accepts it without models.allow_untagged",
    )
    common(m)
    m.add_argument("--version", required=True, help="the model version to pin")
    m.set_defaults(func=cmd_pin_manifest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    for noisy in ("mlflow", "alembic", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
