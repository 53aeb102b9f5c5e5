"""``sft-optuna ...`` commands. ``main(argv) -> int`` so tests run the CLI in-process."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import typing
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from sft_optuna.config import StudyConfig
from sft_optuna.coordination.retrying import is_storage_error
from sft_optuna.coordination.storage import OUTAGE_S, Storage, error_reason, open_storage, resolve_url
from sft_optuna.errors import NodeFault, StorageUnavailable, UserError
from sft_optuna.node import DEFAULT_CHECKPOINT_DIR, DEFAULT_DEVICE
from sft_optuna.study import create_study, load_study
from sft_optuna.study_file import load_study_file

__all__ = ["main"]

log = logging.getLogger("sft_optuna")


DEVICE_HELP = f"auto | cpu | cuda | cuda:N | mps (default: {DEFAULT_DEVICE})"
QUERY_PATIENCE_S = 5.0  # status/best/export/studies: a person waiting at a prompt; a wrong host should fail fast


def _open(args: argparse.Namespace, patience: float = OUTAGE_S) -> Storage:
    """The storage of ``--storage``; workers and other long-running commands wait out outages (60 s). A look-up
    command (it waits a person's few seconds) never creates a storage."""
    return open_storage(resolve_url(args.storage), patience, create=patience > QUERY_PATIENCE_S)


def _worker_options(args: argparse.Namespace) -> Any:
    from sft_optuna.worker import WorkerOptions  # torch is imported only by commands that train

    return WorkerOptions(
        device=args.device,
        data_root=args.data_root,
        max_trials=args.max_trials,
        checkpoint_dir=None if args.checkpoint_dir == "none" else args.checkpoint_dir,
        threads=args.threads,
        device_memory=getattr(args, "device_memory", None),
        pack=args.pack,
    )


def cmd_create(args: argparse.Namespace) -> int:
    config = load_study_file(args.study_file)
    storage = _open(args)
    warm = (args.warm_start, args.top) if args.warm_start else None
    study, created = create_study(config, storage, args.study_file, warm)
    queued = sum(1 for t in study.get_trials(deepcopy=False) if "warm_start_from" in t.user_attrs) if created else 0
    extra = f", its first {queued} trial(s) warm-started from study {args.warm_start!r}" if queued else ""
    print(f"{'created' if created else 'exists (same config)'}: study {config.name!r} in {storage.masked}{extra}")
    return 0


def _work(
    study: optuna.Study, config: StudyConfig, storage: Storage, args: argparse.Namespace, node: Any = None
) -> int:
    from sft_optuna.worker import run_worker

    try:
        return run_worker(study, config, _worker_options(args), node)
    except NodeFault as exc:
        print(f"sft-optuna: error: this node cannot run trials: {exc}; worker stopped", file=sys.stderr)
        return 1
    except Exception as exc:
        if not (isinstance(exc, (StorageUnavailable, OSError)) or is_storage_error(exc)):
            raise
        reason = error_reason(exc)
        print(
            f"sft-optuna: error: storage {storage.masked} failed ({reason}); worker stopped, "
            "its trial will be retried from its checkpoint",
            file=sys.stderr,
        )
        return 3


def cmd_worker(args: argparse.Namespace) -> int:
    storage = _open(args)
    study, config = load_study(args.name, storage)
    return _work(study, config, storage, args)


def cmd_run(args: argparse.Namespace) -> int:
    from sft_optuna.worker import prepare_node

    config = load_study_file(args.study_file)
    storage = _open(args)
    node = prepare_node(config, _worker_options(args))  # device, weights, data: checked before the study exists
    study, _ = create_study(config, storage, args.study_file)
    code = _work(study, config, storage, args, node)
    _print_status(study, config)
    return code


def cmd_launch(args: argparse.Namespace) -> int:
    from sft_optuna.launch import launch, parse_gpus
    from sft_optuna.node import resolve_threads

    gpus = parse_gpus(args.gpus)
    threads = resolve_threads(args.threads)
    storage = _open(args)
    _, config = load_study(args.name, storage)  # fail here, once, if the study does not exist
    workers_per_gpu = args.workers_per_gpu
    if workers_per_gpu == "auto":
        from sft_optuna.packing import calibrate_node

        calibration = calibrate_node(config, None if gpus == ["cpu"] else gpus[0])
        log.info("%s", calibration.describe())
        workers_per_gpu = calibration.workers
    # The URL (and its password) reaches the workers through their environment, never their command line,
    # which every user of the node can read with ps.
    argv = [
        "--log-level",
        args.log_level,
        "worker",
        args.name,
        "--checkpoint-dir",
        args.checkpoint_dir,
    ]
    if args.data_root:
        argv += ["--data-root", args.data_root]
    if args.max_trials is not None:
        argv += ["--max-trials", str(args.max_trials)]
    if args.pack > 1:
        argv += ["--pack", str(args.pack)]
    return launch(gpus, workers_per_gpu, argv, storage.url, threads)


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def _print_status(study: optuna.Study, config: StudyConfig) -> None:
    from sft_optuna.results.status import status_lines

    print("\n".join(status_lines(study, config)))


def cmd_status(args: argparse.Namespace) -> int:
    storage = _open(args, QUERY_PATIENCE_S)
    study, config = load_study(args.name, storage)
    _print_status(study, config)
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    storage = _open(args, QUERY_PATIENCE_S)
    study, config = load_study(args.name, storage)
    from sft_optuna.results.export import best_train_block

    block = best_train_block(study, config)
    if args.format == "json":
        print(json.dumps(block, indent=2))
    else:
        print(f"# best trial {block['trial']} of study {config.name!r}: validation accuracy {block['value']:.4f}")
        print(yaml.safe_dump({"model": block["model"], "train": block["train"]}, sort_keys=False), end="")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sft_optuna.results.export import check_output_dir, export_study

    out = check_output_dir(Path(args.out), "--out")  # a mistake in the command line first, before the storage
    storage = _open(args, QUERY_PATIENCE_S)
    study, config = load_study(args.name, storage)
    written = export_study(study, config, out)
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        print(f"wrote {args.out}/trials.csv; no completed trial yet, so no best.yaml and no figures")
        return 0
    print(f"wrote {len(written)} files to {args.out}: " + ", ".join(p.name for p in written))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from sft_optuna.node import resolve_device, use_threads
    from sft_optuna.results.export import check_output_dir
    from sft_optuna.results.retrain import retrain_best

    device = resolve_device(args.device)
    use_threads(args.threads)
    out = check_output_dir(Path(args.out), "--out")  # created once there is something to write
    storage = _open(args)
    study, config = load_study(args.name, storage)
    card = retrain_best(study, config, args.seeds, device, out, args.epochs, args.train_subset, args.data_root)
    print(
        f"test accuracy {card['test_acc_mean']:.4f} ± {card['test_acc_std']:.4f} over {args.seeds} seed(s): "
        + ", ".join(f"{a:.4f}" for a in card["test_acc"])
        + f"; model card: {out / 'model-card.json'}"
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from sft_optuna.node import resolve_device, use_threads
    from sft_optuna.results.plan import calibrate, describe, make_plan, train_image_count

    config = load_study_file(args.study_file)
    device = resolve_device(args.device)
    use_threads(args.threads)
    images = train_image_count(config, args.data_root)
    if images <= 0:
        where = args.data_root or config.data.root
        raise UserError(
            f"plan: no training images left at {where} after data.val_size {config.data.val_size} (the data is not "
            "on this node, or too small): give --data-root, or lower data.val_size"
        )
    ips = calibrate(config, device, data_root=args.data_root)
    plan = make_plan(config, ips, images)
    print(describe(config, plan, str(device)))
    from sft_optuna.packing import cached_calibration, device_label

    packing = cached_calibration(config, device_label(device))
    print(
        packing.describe()
        if packing is not None
        else "workers per GPU: not measured on this node for this study's shape (launch --workers-per-gpu auto)"
    )
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from sft_optuna.results.dashboard import access, build_app, serve

    storage = _open(args)
    read_only_mode, password = access(args.host, args.read_only)
    app = build_app(storage.optuna, read_only_mode, args.user, password)
    print(
        f"dashboard for {storage.masked} on http://{args.host}:{args.port}/dashboard"
        f"{' (read-only)' if read_only_mode else ''}{' (basic auth)' if password else ''}",
        flush=True,
    )
    try:
        serve(app, args.host, args.port)
    except OSError as exc:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0


def cmd_proxy(args: argparse.Namespace) -> int:
    from sft_optuna.coordination.proxy import HANDLERS_PER_CONNECTION, serve, serve_processes
    from sft_optuna.results.dashboard import is_loopback

    url = resolve_url(args.storage)
    storage = open_storage(url, OUTAGE_S, connections=args.threads)
    if not is_loopback(args.host):
        log.warning(
            "the proxy has no authentication: anyone who reaches %s:%d can read and change every study in %s; "
            "keep it on a private network",
            args.host,
            args.port,
            storage.masked,
        )
    n = args.processes
    print(
        f"proxy for {storage.masked} on grpc://{args.host}:{args.port} ({n} process{'es' if n > 1 else ''} × "
        f"{args.threads} database connections, {HANDLERS_PER_CONNECTION * args.threads} requests at once)",
        flush=True,
    )
    if n > 1:
        serve_processes(url, storage, args.host, args.port, args.threads, n)
    else:
        serve(storage, args.host, args.port, args.threads)
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    storage = _open(args, QUERY_PATIENCE_S)
    names = storage.study_names()
    if not names:
        print(f"no studies in {storage.masked}")
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage.optuna)
        trials = study.get_trials(deepcopy=False)
        best = _best(study)
        states = Counter(t.state.name for t in trials)
        print(
            f"{name}\ttrials {len(trials)} ({', '.join(f'{k} {v}' for k, v in sorted(states.items()))})"
            f"\tbest {f'{best.value:.4f}' if best is not None else '-'}"
        )
    return 0


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (``--threads 0`` or ``-2`` is a mistake, not "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _add_common_args(p: argparse.ArgumentParser, top: bool) -> None:
    """``--storage`` and ``--log-level`` before or after the command (``sft-optuna status NAME --storage URL``
    as Optuna's own CLI takes it). Below the top level the defaults are suppressed, so they never undo a value
    given before the command."""
    default: Any = None if top else argparse.SUPPRESS
    p.add_argument(
        "--storage", default=default, help="storage URL (default: $SFT_OPTUNA_STORAGE, else sqlite:///sft-optuna.db)"
    )
    p.add_argument(
        "--log-level", default="INFO" if top else argparse.SUPPRESS, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )


def _add_worker_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        p.add_argument("--device", default=DEFAULT_DEVICE, help=DEVICE_HELP)
    p.add_argument("--data-root", default=None, help="where this node keeps the data (overrides data.root)")
    p.add_argument(
        "--max-trials",
        "--n-trials",  # its old name, kept working; budget.n_trials is the study's budget
        dest="max_trials",
        type=_positive_int,
        default=None,
        help="this worker stops after this many trials (the study's budget.n_trials still applies)",
    )
    p.add_argument(
        "--checkpoint-dir",
        default=DEFAULT_CHECKPOINT_DIR,
        help=f"shared directory for per-epoch checkpoints, or 'none' (default: {DEFAULT_CHECKPOINT_DIR})",
    )
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: $OMP_NUM_THREADS)")
    p.add_argument(
        "--pack",
        type=_positive_int,
        default=1,
        help="trials this worker trains at once, those of one shape fused into one model (default 1)",
    )
    if device:
        p.add_argument(
            "--device-memory",
            type=_bytes,
            default=None,
            help="memory of its device this worker may use, e.g. 20GB (default: all that is free); "
            "data.placement decides against it",
        )


def _workers_per_gpu(text: str) -> int | str:
    """argparse type: ``auto`` or a whole number >= 1."""
    return "auto" if text == "auto" else _positive_int(text)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _bytes(text: str) -> int:
    """argparse type: a size like ``20GB``, ``512MiB`` or a number of bytes."""
    number = text.strip()
    digits = number.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")
    unit = number[len(digits) :].strip().upper()
    try:
        value = float(digits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 20GB, 512MiB)") from None
    if unit not in _UNITS or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 20GB, 512MiB)")
    return int(value * _UNITS[unit])


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = _Parser(prog="sft-optuna", description="Hyperparameter search for fine-tuning.")
    _add_common_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create", help="create a study from a study file (no-op if it exists unchanged)")
    p.add_argument("study_file")
    p.add_argument(
        "--warm-start",
        metavar="OTHER",
        default=None,
        help="run the best configurations of study OTHER (same storage) first, projected into this study's space",
    )
    p.add_argument("--top", type=_positive_int, default=5, help="how many of OTHER's best to run first (default 5)")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("worker", help="pull trials of study NAME until its budget is spent")
    p.add_argument("name")
    _add_worker_args(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("run", help="create the study if needed, then work on it (one machine)")
    p.add_argument("study_file")
    _add_worker_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("launch", help="start one worker per GPU of this node for study NAME")
    p.add_argument("name")
    p.add_argument("--gpus", default="all", help="all | cpu | GPU indices like 0,1,3 (default: all)")
    p.add_argument(
        "--workers-per-gpu",
        type=_workers_per_gpu,
        default=1,
        help="workers sharing each GPU, or auto: measured once per node (1, 2, 4, ... together) and chosen where "
        "adding workers adds less than 10%% images/s (default 1)",
    )
    _add_worker_args(p, device=False)
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("status", help="trials by state, best value, running trials")
    p.add_argument("name")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("best", help="the best trial's recipe as model: and train: blocks")
    p.add_argument("name")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("export", help="trials.csv, best.yaml and figures (HTML + PNG) of study NAME")
    p.add_argument("name")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("retrain", help="train the best recipe on train+val over seeds, report test accuracy")
    p.add_argument("name")
    p.add_argument("--seeds", type=_positive_int, default=3)
    p.add_argument("--epochs", type=_positive_int, default=None, help="override the recipe's epochs")
    p.add_argument("--out", required=True, help="output directory (models, model-card.json, summary.md)")
    p.add_argument(
        "--train-subset",
        type=_positive_int,
        default=None,
        help="train on a stratified subset of this many training images (default: the study's data.train_subset)",
    )
    p.add_argument("--device", default=DEFAULT_DEVICE, help=DEVICE_HELP)
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: $OMP_NUM_THREADS)")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("plan", help="budget preview of a study file, from a short measured calibration")
    p.add_argument("study_file")
    p.add_argument("--device", default=DEFAULT_DEVICE, help=DEVICE_HELP)
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=_positive_int, default=None)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard on the storage (127.0.0.1 by default)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    ro = p.add_mutually_exclusive_group()
    ro.add_argument(
        "--read-only",
        dest="read_only",
        action="store_true",
        default=None,
        help="refuse every request that changes the storage (default when --host is not loopback)",
    )
    ro.add_argument(
        "--writable",
        dest="read_only",
        action="store_false",
        help="allow notes, deletions and other changes even on a non-loopback address",
    )
    p.add_argument(
        "--user", default="sft", help="basic-auth user; the password comes only from $SFT_OPTUNA_DASHBOARD_PASSWORD"
    )
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("proxy", help="serve the storage to many workers over gRPC (workers use grpc://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=13000)
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=16,
        help="database connections held (default 16); it serves 4 requests at once per connection",
    )
    p.add_argument(
        "--processes",
        type=_positive_int,
        default=1,
        help="proxy processes on the port, each with --threads threads and connections (default 1: one core)",
    )
    p.set_defaults(func=cmd_proxy)

    p = sub.add_parser("studies", help="studies in the storage, with trial counts")
    p.set_defaults(func=cmd_studies)
    for command in sub.choices.values():
        _add_common_args(command, top=False)
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level), format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("sft_optuna").setLevel(getattr(logging, level))
    # Optuna's own INFO lines repeat ours ("Trial N finished ..."); keep its warnings.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("filelock").setLevel(logging.WARNING)  # its DEBUG lines drown ours
    # enqueue_trial's user_attrs and similar are marked experimental; these warnings would only alarm users.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code. User errors are one line on stderr, exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as exc:
        print(f"sft-optuna: error: {exc}", file=sys.stderr)
        return 2
    except StorageUnavailable as exc:  # a command other than a worker's: one line, the outage code
        print(f"sft-optuna: error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        # Ctrl-C twice in a worker (the trial was already marked interrupted and resumes from its checkpoint),
        # or Ctrl-C in any other command: a person's decision, not a crash.
        print("sft-optuna: interrupted", file=sys.stderr)
        return 130


def main_entry() -> None:
    """Console-script entry point."""
    try:
        code = main()
        # The command is done (a worker stopped after its epoch, say): a late Ctrl-C must not turn the exit
        # into a traceback or a death by signal while the interpreter shuts down.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:  # a Ctrl-C that lands between the command's own handlers
        print("sft-optuna: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
