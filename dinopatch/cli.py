"""The command line: ``dinopatch COMMAND`` (also ``python -m dinopatch``).

Commands: fit, update, predict, evaluate, demo, export, weights, watch, drift, tune-engine, info; serve,
score-archive and benchmark-quality parse their own flags in their own modules (:data:`OWN_PARSER_COMMANDS`).

A mistake (a wrong path, a flag out of range, an output that exists) prints one
line, ``dinopatch: error: ...``, and exits with :data:`EXIT_USAGE`; ``--debug``
shows the traceback instead.  ``predict`` exits with :data:`EXIT_SOME_FAILED`
when some inputs could not be scored (each has its error in
``predictions.jsonl``).  The choices of backbones, engines, kernels and image
scores are read from the registries, so a new one appears here by itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import sys
from pathlib import Path

from . import engine_choice, golden, margin, params
from ._version import __version__
from .backbone import PRECISIONS, DeviceUnavailableError, WeightsUnavailableError
from .outputs import claim, output_folder, refuse_overlap

EXIT_USAGE = 2
EXIT_SOME_FAILED = 3
DESCRIPTION = ("DinoPatch finds defects in images of parts after seeing only good ones: fit a model on good "
               "parts, predict on new ones, evaluate on a folder in the MVTec AD layout.")
EPILOG = (f"Exit codes: 0 done; {EXIT_USAGE} a usage mistake (one line on stderr; --debug shows the "
          f"traceback); {EXIT_SOME_FAILED} predict scored some inputs but not all (see the error field in "
          "predictions.jsonl).")
# evaluate's --seed also seeds its split, so it is honoured with -m like a run-time flag.
SPLIT_SEED = "seed"
# The default of every detector flag in the parser that finds which were given.
_UNSET = object()
PREDICT_FILES = ("predictions.jsonl", "scores.csv", "overlays", "maps", "drift.json", "mqtt.cursor")
REPORT_FILES = ("metrics.json", "index.html", "roc.png", "pr.png", "hist.png", "pose.png", "overlays")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default; an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Usage mistakes are one line, not a usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"dinopatch: error: {message} (see {self.prog} -h)\n")


# ----------------------------------------------------------------------------- argument types

def number_type(kind, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
                auto: bool = False):
    """An argparse type: a finite number of ``kind`` in the interval from ``low`` to ``high`` (or "auto")."""
    def check(text: str):
        if auto and text == "auto":
            return text
        try:
            value = kind(text)
        except ValueError:
            what = ("an integer" if kind is int else "a number") + (" or 'auto'" if auto else "")
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low) \
                or (high_open and value == high):
            raise argparse.ArgumentTypeError(
                f"{text} is outside {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
        return value
    return check


# ----------------------------------------------------------------------------- detector flags

def _fitted_flags() -> dict[str, str]:
    """Parameter -> flag of the parameters a model file fixes (read from the table: a new one appears here)."""
    return {p.name: p.flag for p in params.PARAMS if p.flag and not p.runtime}


def _runtime_flags() -> tuple[str, ...]:
    """The parameters that say how to run a model, honoured with -m."""
    return tuple(p.name for p in params.PARAMS if p.flag and p.runtime)


def _add_detector_args(p: argparse.ArgumentParser) -> None:
    params.add_flags(p, _fitted_flags(), group="detector (what is fitted)")
    params.add_flags(p, _runtime_flags(), group="run time (how to run; may differ from the model file's)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    params.add_flags(p, _runtime_flags(), defaults=dict.fromkeys(_runtime_flags()),
                     group="run time (how to run; may differ from the model file's)",
                     default_note=" (default: the model file's)")


def _explicit(argv: list[str]) -> set[str]:
    """The detector flags given on the command line (not left at their defaults)."""
    args = build_parser(defaults=False).parse_args(argv)
    return {k for k, v in vars(args).items() if v is not _UNSET}


def _new_detector(args):
    from .detector import DinoPatch

    return DinoPatch().set_params(**params.from_flags(args, [*_fitted_flags(), *_runtime_flags()]))


def _load_model(path: str, runtime: dict):
    from .detector import DinoPatch

    if path.lower().endswith(".onnx"):
        raise ValueError(f"{path} is a backbone export, not a model file: give the model (.npz) with -m "
                         f"and the export with --engine {path}")
    return DinoPatch.load(path, **runtime)


def _start_engine(det) -> str:
    """Build the model's engine now and name it: a foreign export fails before any output is touched, and
    the first batch's latency measures images, not loading the backbone."""
    backbone = det.backbone_for()
    return backbone.engine if det.engine == "auto" else os.fspath(det.engine)


# ----------------------------------------------------------------------------- commands

def cmd_fit(args) -> int:
    from .inputs import training_files

    files, notes = training_files(args.images)
    out = Path(args.output)
    refuse_overlap(out, args.images, inside_ok=True)
    claim([out], args.force)
    for note in notes:
        print(note)
    det = _new_detector(args)
    print(f"fitting {det.backbone} (weights {det.weights}) at {det.image_size} px, "
          f"{'aligned' if det.align else 'not aligned'}, on {len(files)} images")
    det.fit(files)
    print(det.fit_report_.describe())
    if pose := det.model_.aligner.describe([os.fsdecode(f) for f in files]):
        print(pose)
    if (fg := det.model_.foreground) is not None:
        print(margin.describe(fg))
    if det.auto_:
        print(f"auto chose {det.auto_['chosen']}{' (too few images: defaults)' * det.auto_['fallback']}")
    if det.model_.engine_choice:
        print(engine_choice.table(det.model_.engine_choice))
    path = det.save(out)
    print(f"threshold {det.threshold_.image:.4f} ({det.threshold_.describe()}); saved {path} "
          f"(model id {det.model_id})")
    return 0


def cmd_update(args) -> int:
    from .inputs import training_files

    files, notes = training_files(args.images)
    out = Path(args.output)
    refuse_overlap(out, [args.model, *args.images], inside_ok=True)
    claim([out], args.force)
    for note in notes:
        print(note)
    det = _load_model(args.model, params.from_flags(args, _runtime_flags()))
    parent = det.model_id
    det.update(files, force=args.force_parts)
    entry = det.model_.good.lineage[-1]
    if entry["forced"]:
        print(f"taken although the model it updates scored them as clear defects: {', '.join(entry['forced'])}")
    print(det.fit_report_.describe())
    path = det.save(out)
    print(f"model {parent} updated with {entry['added']} good parts ({entry['kept']} kept by the good-set check): "
          f"threshold {det.threshold_.image:.4f} ({det.threshold_.describe()}); saved {path} "
          f"(model id {det.model_id})")
    return 0


def cmd_predict(args) -> int:
    import cv2

    from .inputs import common_root, prediction_files
    from .predictions import predict_files

    files, masks = prediction_files(args.images)
    out = Path(args.output)
    output_folder(out)
    refuse_overlap(out, args.images)
    runtime = params.from_flags(args, _runtime_flags())
    det = _load_model(args.model, runtime)
    engine = _start_engine(det)
    claim([out / name for name in PREDICT_FILES], args.force, folders_ok=True)
    if masks:
        print(f"left out {masks} ground-truth masks (files under ground_truth/)")
    # Each unreadable file is recorded with its error; OpenCV's own warning about it is noise.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    stamp, outbox = _line_outputs(det, out, args.mqtt)
    try:
        summary = predict_files(det, files, out, root=common_root(files), overlays=not args.no_overlays,
                                save_maps=args.save_maps, progress=not args.quiet, engine=engine, stamp=stamp)
    finally:
        _close_line_outputs(stamp, outbox, out, args.mqtt_wait)
    print(f"{summary.scored} scored, {summary.anomalous} anomalous, {summary.failed} failed; "
          f"threshold {det.threshold_.image:.4f} ({det.threshold_.describe()}); model id {det.model_id}; "
          f"results in {out / 'predictions.jsonl'} and {out / 'scores.csv'}")
    if summary.failed:
        path, error = summary.first_error
        print(f"dinopatch: {summary.failed} input(s) could not be scored, e.g. {path}: {error}",
              file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


def _line_outputs(det, out: Path, mqtt_url: str | None):
    """The record stamp (id, drift) and, with ``--mqtt``, the outbox publishing ``out/predictions.jsonl``."""
    from .stamp import Stamp

    out.mkdir(parents=True, exist_ok=True)
    outbox = None
    if mqtt_url:
        from .mqtt import Outbox

        outbox = Outbox(mqtt_url, out / "predictions.jsonl").start()
    return Stamp(det), outbox


def _close_line_outputs(stamp, outbox, out: Path, wait: float) -> None:
    """Write the drift summary, print it, and wait up to ``wait`` s for the outbox to deliver."""
    import json

    (out / "drift.json").write_text(json.dumps(stamp.monitor.summary(), indent=1) + "\n")
    print(stamp.monitor.describe())
    if outbox is not None:
        left = outbox.close(wait)
        print(f"mqtt: {outbox.delivered} records delivered to {outbox.topic}"
              + (f"; {left} wait in the outbox ({out / 'predictions.jsonl'} after {outbox.cursor}): a later "
                 f"run with -o {out} and --mqtt delivers them" if left else ""))


def cmd_watch(args) -> int:
    import signal
    import threading

    import cv2

    from .watch import FolderWatch

    out = Path(args.output)
    output_folder(out)
    if os.path.abspath(out) == os.path.abspath(args.folder):
        raise ValueError("the output folder must not be the watched folder: give another -o")
    det = _load_model(args.model, params.from_flags(args, _runtime_flags()))
    engine = _start_engine(det)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    stamp, outbox = _line_outputs(det, out, args.mqtt)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        watch = FolderWatch(det, args.folder, out, settle=args.settle, move_done=args.move_done, engine=engine,
                            stamp=stamp, on_record=outbox and outbox.notify)
        print(f"watching {args.folder} (model id {det.model_id}); records in {out / 'predictions.jsonl'}; "
              "stop with Ctrl-C or SIGTERM", flush=True)
        summary = watch.run(stop=stop, max_files=args.max_files, idle_exit=args.idle_exit)
    finally:
        _close_line_outputs(stamp, outbox, out, args.mqtt_wait)
    print(f"{summary.scored} scored, {summary.anomalous} anomalous, {summary.failed} failed in this run"
          + (f" ({summary.resumed} records were there before: resumed)" if summary.resumed else ""))
    return EXIT_SOME_FAILED if summary.failed else 0


def cmd_drift(args) -> int:
    import json

    from .drift import Monitor, replay

    det = _load_model(args.model, {})
    with open(args.predictions, encoding="utf-8", errors="surrogateescape") as f:
        monitor = replay(Monitor.for_model(det), f)
    if args.json:
        print(json.dumps(monitor.summary(), indent=1))
    else:
        print(monitor.describe())
        for chart, value in monitor.summary()["cusum"].items():
            print(f"  {chart:<12} CUSUM {value:7.2f} (flag above {monitor.h:g})")
    return 0


def _add_line_args(p: argparse.ArgumentParser) -> None:
    """The flags of a command that scores parts for the line: --mqtt, --mqtt-wait and the run-time flags."""
    p.add_argument("--mqtt", metavar="mqtt://HOST:PORT/TOPIC", default=None,
                   help="also publish every record as JSON to this MQTT topic (QoS 1, in order; while the broker "
                        "is away they wait on disk in the output folder); needs the line extra (default: none)")
    p.add_argument("--mqtt-wait", type=number_type(float, 0, 86400), default=30.0,
                   help="seconds to wait at the end for the broker to take the records still waiting")
    _add_runtime_args(p)


def cmd_evaluate(args) -> int:
    from .data import MVTecFolder
    from .evaluate import check_layout, evaluate, line_summary

    folder = MVTecFolder(args.data)
    check_layout(folder, need_train=args.model is None)
    out = Path(args.output)
    output_folder(out)
    refuse_overlap(out, [args.data])
    if args.save_model:
        refuse_overlap(Path(args.save_model), [args.data, *([args.model] if args.model else [])], inside_ok=True)
    if args.model:
        given = _explicit(args.argv)
        fitted = {k: flag for k, flag in _fitted_flags().items() if k != SPLIT_SEED}
        fixed = sorted(fitted[k] for k in given & set(fitted))
        if fixed:
            raise ValueError(f"{', '.join(fixed)}: the model file fixes {'this' if len(fixed) == 1 else 'these'}; "
                             "such flags apply only when evaluate fits (without -m)")
        det = _load_model(args.model, params.from_flags(args, given & set(_runtime_flags())))
        _start_engine(det)
    else:
        det = None
    outputs = [out / name for name in REPORT_FILES] + ([Path(args.save_model)] if args.save_model else [])
    claim(outputs, args.force, folders_ok=True)
    if det is None:
        det = _new_detector(args)
        print(f"fitting {det.backbone} (weights {det.weights}) at {det.image_size} px on "
              f"{folder.root}/train/good")
        det.fit(folder.train_paths())
    m = evaluate(det, folder, out, tune_fraction=args.tune_fraction, seed=args.seed, threshold=args.threshold,
                 tune_on_report=args.tune_on_report, save_model=args.save_model)
    print(line_summary(m))
    keys = ("image_auroc", "average_precision", "pixel_auroc", "aupro", "aupro_05", "f1", "precision", "recall",
            "accuracy")
    print(f"{'':<18}{'tuning part':>12}{'reported':>10}")
    for k in keys:
        print(f"{k:<18}{_cell(m['tuned'][k]):>12}{_cell(m[k]):>10}")
    for warning in m["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if m["optimistic"]:
        print("OPTIMISTIC: tuned on the reported images (--tune-on-report)")
    if args.save_model:
        print(f"tuned model: {m['saved_model']} (threshold {m['settings']['threshold_source']})")
    print(f"report: {(out / 'index.html').resolve()}")
    return 0


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.output, quick=args.quick, weights=args.weights, engine=args.engine)


def cmd_export(args) -> int:
    from .backbone.onnx_export import export_onnx

    if args.output:
        claim([Path(args.output)], args.force)
    path = export_onnx(args.backbone, args.weights, args.image_size, args.layers, args.precision, args.output,
                       args.seed, portable=args.portable)
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB), checked against torch")
    return 0


def cmd_tune_engine(args) -> int:
    from .detector import DinoPatch

    # The reference engine only builds the detector; the candidates are built by the measurement.
    det = DinoPatch.load(args.model, engine="torch", progress=False)
    model = det.model_
    if args.engine:
        det.set_params(engine=args.engine)
        row = engine_choice.check_by_hand(det, model, strict=args.strict)
        print(engine_choice.format_row(row) if row else f"{args.engine} is the reference")
        return 0
    if args.from_evidence:
        if model.engine_choice is None:
            raise ValueError(f"{args.model} holds no engine choice: run tune-engine without --from-evidence")
        record = engine_choice.with_forbidden(model.engine_choice, args.forbid)
        print(engine_choice.table(record))
    else:
        print(f"measuring every engine installed here on the golden set of {args.model} "
              f"({len(model.golden.frames) if model.golden else 0} frames):")
        record = engine_choice.measure(det, model, forbid=args.forbid)
        print(engine_choice.table(record))
        print(f"kept for this machine in {engine_choice.write_cached(model, record)}")
    if args.output:
        claim([Path(args.output)], args.force)
        det.model_ = dataclasses.replace(model, engine_choice=record)
        det.set_params(engine="auto")  # the choice is what "auto" runs; torch only built the detector here
        print(f"wrote {det.save(args.output)} with this choice (model id {det.model_id})")
    return 0


def cmd_info(args) -> int:
    from .detector import DinoPatch

    det = DinoPatch.load(args.model, engine="torch", progress=False)
    model = det.model_
    t = model.threshold
    print(f"model {args.model} (id {det.model_id}): {det.backbone} at {det.image_size} px, weights {det.weights}")
    print(f"threshold {t.image:.4f} ({t.describe()})")
    if model.foreground is not None:
        print(margin.describe(model.foreground))
    if model.golden is None:
        print("golden set: none (fitted before golden sets existed; refit to check engines against it)")
    else:
        g = model.golden
        scores = golden.scores(model.post, g.distances, g.valid)
        print(f"golden set: {len(g.frames)} frames ({int(g.defect.sum())} with pasted defects, "
              f"{int(g.nominal.sum())} nominal as they are), scored by "
              f"{g.reference}: " + ", ".join(f"{s:.4f}{'!' if s > t.image else ''}" for s in scores))
    record = model.engine_choice
    if record is None:
        print("engine choice: none stored (engine='auto' falls back to the static rule)")
        return 0
    here = engine_choice.machine()
    if record["machine"] != here:
        cached = engine_choice.cache_path(det.model_id, here)
        print(f"the stored choice was measured on another machine ({record['machine']}); this one is {here}: "
              + (f"its own is in {cached}" if cached.is_file() else "the first load with engine=auto measures"))
    print(engine_choice.table(record, args.forbid))
    return 0


def cmd_weights(args) -> int:
    from .backbone import get_spec
    from .backbone.weights import write_blocks_matter_checkpoint

    claim([Path(args.output)], args.force)
    path = write_blocks_matter_checkpoint(get_spec(args.backbone), args.output, args.seed)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): random {args.backbone} weights whose blocks "
          f"matter (seed {args.seed}); give it to --weights")
    return 0


# ----------------------------------------------------------------------------- parser

def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The parser; ``defaults=False`` leaves out the detector flags not given (see :func:`_explicit`)."""
    parser = Parser(prog="dinopatch", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter,
                    allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"dinopatch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do; `dinopatch COMMAND -h` lists its options")
    common = Parser(add_help=False, allow_abbrev=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    common.add_argument("--force", action="store_true", help="replace outputs that exist")

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common], formatter_class=HelpFormatter,
                           allow_abbrev=False)
        p.set_defaults(func=func)
        return p

    p = command("fit", "fit on good images and save a model file", cmd_fit)
    p.add_argument("images", nargs="+",
                   help="good images: files, folders, or an MVTec AD category folder (its train/good is "
                        "taken)")
    p.add_argument("-o", "--output", required=True, help="model file to write (.npz)")
    _add_detector_args(p)

    p = command("update", "add operator-confirmed good parts to a model: fitted again on its good parts and "
                          "these, with its lineage", cmd_update)
    p.add_argument("images", nargs="+", help="the confirmed good images: files or folders")
    p.add_argument("-m", "--model", required=True, help="the model file to update (fit, or an earlier update)")
    p.add_argument("-o", "--output", required=True, help="the updated model file to write (.npz)")
    p.add_argument("--force-parts", action="store_true",
                   help="take parts the model scores as clear defects too (refused otherwise, with the reason)")
    _add_runtime_args(p)

    p = command("predict", "score images: predictions.jsonl, scores.csv and heatmap overlays", cmd_predict)
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively; ground_truth/ "
                                             "folders and hidden files are left out)")
    p.add_argument("-m", "--model", required=True, help="model file from fit or evaluate --save-model")
    p.add_argument("-o", "--output", default="predictions", help="output folder")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlays/<input path>.png")
    p.add_argument("--save-maps", choices=("npy", "png"), default=None,
                   help="also write each anomaly map to maps/<input path>.<format>: npy is exact float32; "
                        "png is 16-bit, 65535 = twice the pixel threshold (default: no maps)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_line_args(p)

    p = command("watch", "score image files as they land in a folder, into predictions.jsonl; a restart resumes",
                cmd_watch)
    p.add_argument("folder", help="the folder a camera writes frames into (not its subfolders)")
    p.add_argument("-m", "--model", required=True, help="model file from fit")
    p.add_argument("-o", "--output", required=True,
                   help="output folder: predictions.jsonl there is also the journal a restart resumes from")
    p.add_argument("--settle", type=number_type(float, 0, 3600), default=1.0,
                   help="seconds a file must stay unchanged before it is read (a file renamed into the folder "
                        "is read at once)")
    p.add_argument("--move-done", metavar="DIR", default=None,
                   help="move each scored file into this folder, replacing a file of the same name there "
                        "(default: leave it)")
    p.add_argument("--max-files", type=number_type(int, 1, 2**62), default=None,
                   help="stop after this many files in this run (default: no limit)")
    p.add_argument("--idle-exit", type=number_type(float, 0, 2**31), default=None, metavar="SECONDS",
                   help="stop when nothing arrived and nothing waited for this long (default: run until "
                        "Ctrl-C or SIGTERM)")
    _add_line_args(p)

    p = command("drift", "read a run's predictions.jsonl back: did the line drift from the model's good parts?",
                cmd_drift)
    p.add_argument("predictions", help="predictions.jsonl from predict or watch")
    p.add_argument("-m", "--model", required=True, help="the model file that scored them")
    p.add_argument("--json", action="store_true", help="print the whole summary as JSON")

    p = command("evaluate", "metrics.json, index.html, overlays and curves on an MVTec AD folder",
                cmd_evaluate)
    p.add_argument("data", help="folder with train/good, test/good, test/<defect>, ground_truth/<defect>")
    p.add_argument("-m", "--model",
                   help="a model file (default: fit one on DATA/train/good with the detector flags); with "
                        "it, --engine, --kernel and --batch-size replace the file's, and the other detector "
                        "flags are refused")
    p.add_argument("-o", "--output", default="report", help="report folder")
    p.add_argument("--tune-fraction", type=number_type(float, 0, 1, low_open=True, high_open=True), default=0.5,
                   help="share of each defect type used to tune post-processing; the rest is reported")
    p.add_argument("--threshold", choices=["tuned", "good"], default="tuned",
                   help="'tuned': best F1 on the tuning part; 'good': from held-out good parts only")
    p.add_argument("--tune-on-report", action="store_true",
                   help="tune on the reported images too (the report says it is optimistic)")
    p.add_argument("--save-model", help="write the model with the tuned threshold and post-processing here "
                                        "(default: none)")
    _add_detector_args(p)
    if not defaults:
        # Not a string: argparse would run a string default through the option's type.
        p.set_defaults(**{dest: _UNSET for dest in (*_fitted_flags(), *_runtime_flags())})

    p = command("demo", "synthetic pasta and screw: generate, fit, evaluate (offline)", cmd_demo)
    p.add_argument("-o", "--output", default="dinopatch-demo", help="folder for the data and the reports")
    p.add_argument("--weights", default="pretrained", help="falls back to 'random', loudly, when offline")
    params.add_flags(p, ["engine"])
    p.add_argument("--quick", action="store_true", help="fewer, smaller images (about 20 s)")

    p = command("export", "export a backbone to ONNX, checked against torch", cmd_export)
    params.add_flags(p, ["backbone", "weights", "image_size", "layers", "seed"])
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="int8 for CPUs with VNNI, fp16 for GPUs")
    p.add_argument("--portable", action="store_true",
                   help="standard ONNX ops only (attention as MatMul and Softmax), for runtimes without "
                        "ONNX Runtime's contrib ops (TensorRT, others)")
    p.add_argument("-o", "--output", help="the .onnx file (default: the cache that engine='onnx' reads)")

    p = command("tune-engine", "time every installed engine on a model's golden set and choose the fastest "
                               "that gives the reference's verdicts", cmd_tune_engine)
    p.add_argument("-m", "--model", required=True, help="model file")
    p.add_argument("--forbid", action="append", default=[], metavar="NAME",
                   help="an engine, runtime or precision never to choose (e.g. int8); repeat for more")
    p.add_argument("--from-evidence", action="store_true",
                   help="measure nothing: derive the choice again from the evidence in the model file (with "
                        "--forbid and -o: write the model with those engines forbidden)")
    p.add_argument("--engine", help="check this one engine on the golden set instead (a flip is a warning; "
                                    "default: measure them all)")
    p.add_argument("--strict", action="store_true", help="with --engine: a verdict flip is an error")
    p.add_argument("-o", "--output", help="also write the model with this machine's choice here (default: the "
                                          "model file is left as it is)")

    p = command("info", "what a model file holds: threshold, golden set, the engine choice and its evidence",
                cmd_info)
    p.add_argument("model", help="model file")
    p.add_argument("--forbid", action="append", default=[], metavar="NAME",
                   help="show the choice with this engine, runtime or precision forbidden")

    p = command("weights", "write seeded random weights whose blocks matter, as a checkpoint file", cmd_weights)
    p.add_argument("--random-blocks", action="store_true", required=True,
                   help="every LayerScale at 1 (timm's random init leaves the blocks near the identity); the "
                        "same weights as --weights random-blocks")
    params.add_flags(p, ["backbone", "seed"])
    p.add_argument("-o", "--output", required=True, help="the checkpoint to write (.safetensors)")
    for name, (_, what) in OWN_PARSER_COMMANDS.items():
        sub.add_parser(name, help=f"{what} (`dinopatch {name} -h` lists its options)", add_help=False)
    return parser


# Sub-commands that parse their own flags in their own modules, imported only when run so that
# `import dinopatch.cli` needs neither Ray nor the benchmark's renderers: name -> (module, help).
OWN_PARSER_COMMANDS = {
    "serve": ("serve", "serve a model over HTTP, on Ray"),
    "score-archive": ("archive", "score a folder, glob or list of images into Parquet, on Ray"),
    "benchmark-quality": ("benchmark_quality", "the harder synthetic benchmark: AUROC and AUPRO per defect")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in OWN_PARSER_COMMANDS:
        return importlib.import_module(f".{OWN_PARSER_COMMANDS[argv[0]][0]}", __package__).main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("dinopatch: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, WeightsUnavailableError, DeviceUnavailableError,
            engine_choice.EngineMismatchError) as e:
        if args.debug:
            raise
        hint = " (see the install options in the README)" if isinstance(e, ImportError) else ""
        print(f"dinopatch: error: {' '.join(str(e).split())}{hint}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
