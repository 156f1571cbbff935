"""The detector's parameters, declared once: what each is, what it may be, and how it is given.

:data:`PARAMS` is read by everything that names a parameter: ``DinoPatch.__init__``
(a test holds its signature to the table), ``get_params`` / ``set_params``,
:func:`check` (at fit, and on every model file's header at load), and the flags
of every command (:func:`add_flags`).  Adding a parameter is one :class:`Param`
entry here plus its line in ``DinoPatch.__init__`` (docs/design.md, "Extending").

A *fitted* parameter is fixed by the model file; a *run-time* one says how to
run it and may differ between save and load.  An ``auto`` parameter may also be
``"auto"``: fit chooses it from the good parts (:mod:`.autotune`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any, Callable

import numpy as np

from . import kernels
from .backbone import BACKBONES, get_spec
from .backbone.device import parse_device, require
from .backbone.engines import ENGINES, canonical_engine
from .backbone.specs import check_image_size
from .bank import MATCHES
from .calibration import Threshold, check_calibration, check_rate
from .foreground import check_option
from .goodset import OUTLIERS
from .postprocess import MAX_MORPH_KERNEL, MAX_SIGMA, SCORES
from .register import MODES, check_register

MAX_IMAGE_SIZE = 14 * 144  # 2016 px: 20736 tokens, beyond any DINOv2 use
MAX_BATCH = 1024
MAX_LAYERS = 24  # the deepest DINOv2 (ViT-L/14, ViT-g has 40 but is not registered)

Bound = int | float | Callable[[dict], Any]
_AS_DEFAULT = object()  # Param.missing: a model file without the parameter meant its default


@dataclasses.dataclass(frozen=True)
class Integer:
    """An integer in ``[lo, hi]``; a bound may be a function of the parameters checked before it."""

    lo: Bound
    hi: Bound
    choices = None

    def check(self, name: str, v, p: dict) -> int:
        lo, hi = (b(p) if callable(b) else b for b in (self.lo, self.hi))
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
            raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        return int(v)

    def parse(self, text: str) -> int:
        return int(text)

    @property
    def standalone(self) -> bool:
        """Checkable without the other parameters (on the command line, as the flag is read)."""
        return not callable(self.lo) and not callable(self.hi)


@dataclasses.dataclass(frozen=True)
class Number:
    """A finite number between ``lo`` and ``hi``, each end open or closed."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    choices = None

    def check(self, name: str, v, p: dict) -> float:
        number = not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))
        if not number or not math.isfinite(v) or not (self.lo < v if self.lo_open else self.lo <= v) \
                or not (v < self.hi if self.hi_open else v <= self.hi):
            raise ValueError(f"{name} must be in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                             f"{')' if self.hi_open else ']'}, got {v!r}")
        return float(v)

    def parse(self, text: str) -> float:
        return float(text)

    standalone = True


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of ``options`` (compared by value; True is not 1)."""

    options: tuple

    @property
    def choices(self) -> tuple:
        return self.options

    def check(self, name: str, v, p: dict):
        if not any(v == o and type(v) is type(o) for o in self.options):
            raise ValueError(f"{name} must be one of {self.options}, got {v!r}")
        return v

    def parse(self, text: str):
        return text

    standalone = True


@dataclasses.dataclass(frozen=True)
class Flag:
    """True or False; its command-line flag turns the default over (``--mirror``, ``--no-align``)."""

    choices = None
    standalone = True

    def check(self, name: str, v, p: dict) -> bool:
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False, got {v!r}")
        return v


@dataclasses.dataclass(frozen=True)
class Checked:
    """A value checked by a function of the stage that owns the concept: ``fn(value, params) -> value``.

    ``standalone``: ``fn`` reads no other parameter, so the command line checks the flag as it reads it.
    """

    fn: Callable[[Any, dict], Any]
    parse: Callable[[str], Any] = str
    choices: tuple | None = None
    standalone: bool = False

    def check(self, name: str, v, p: dict):
        return self.fn(v, p)


@dataclasses.dataclass(frozen=True)
class Param:
    """One detector parameter.

    Args:
        name: the keyword of ``DinoPatch(...)``.
        default: its default.
        rule: what it may be (:class:`Integer`, :class:`Number`, :class:`OneOf`, :class:`Flag`, :class:`Checked`).
        help: one line for ``-h`` and the docs.
        auto: it may also be ``"auto"``.
        runtime: how to run, not what is fitted (may differ between save and load).
        flag: its command-line flag, or None for none.
        missing: what a model file written before the parameter existed meant (default: ``default``).
        flag_values: the words the flag takes for values that are not strings (``{"on": True}``).
    """

    name: str
    default: Any
    rule: Any
    help: str
    auto: bool = False
    runtime: bool = False
    flag: str | None = None
    missing: Any = _AS_DEFAULT
    flag_values: dict | None = None

    @property
    def legacy(self):
        """The value of a model file that does not name this parameter."""
        return self.default if self.missing is _AS_DEFAULT else self.missing


def _side(p: dict) -> int:
    return p["image_size"] // get_spec(p["backbone"]).patch_size


def _image_size(v, p: dict) -> int:
    spec = get_spec(p["backbone"])
    return check_image_size(Integer(spec.patch_size, MAX_IMAGE_SIZE).check("image_size", v, p), spec.patch_size)


def _path_or_name(name: str):
    def check(v, p: dict) -> str:
        if not isinstance(v, (str, os.PathLike)):
            raise ValueError(f"{name} must be a name or a path, got {v!r}")
        return os.fspath(v)
    return check


def _engine(v, p: dict) -> str:
    return canonical_engine(_path_or_name("engine")(v, p), warn=False)


def _device(v, p: dict) -> str:
    parse_device(v)
    require(v)  # a GPU named that is not there fails before any work
    return v


def _threshold(v, p: dict):
    return None if v is None else Threshold.given(v).image


def _tolerance(v, p: dict):
    # "map": a tolerance for each location, measured at fit (:mod:`.tolerance`).
    return v if isinstance(v, str) and v == "map" else Integer(0, _side(p) - 1).check("tolerance", v, p)


def _parse_calibration(text: str):
    return text if text == "cv" else float(text)


PARAMS: tuple[Param, ...] = (
    Param("backbone", "dinov2_vits14", OneOf(tuple(sorted(BACKBONES))), "DINOv2 or DINOv3 variant", flag="--backbone"),
    Param("weights", "pretrained", Checked(_path_or_name("weights")),
          "'pretrained' (from the hub; fails at once offline), 'random' (seeded), 'random-blocks' (seeded, every "
          "block matters) or a checkpoint file (.pth or .safetensors)", flag="--weights"),
    Param("image_size", 448, Checked(_image_size, int),
          "backbone input side in pixels, a multiple of the patch size (14; DINOv3: 16)",
          flag="--image-size"),
    Param("align", True, Flag(), "turn parts to a canonical pose (--no-align: fixtured parts, flat textures)",
          flag="--no-align"),
    Param("engine", "auto", Checked(_engine, standalone=True),
          f"backbone engine: {', '.join(ENGINES)} or an .onnx export (runs without torch)", runtime=True,
          flag="--engine"),
    Param("kernel", "auto", OneOf(("auto", *kernels.KERNELS)), "distance kernel; 'auto' takes the fastest "
          "installed", runtime=True, flag="--kernel"),
    Param("seed", 0, Integer(0, 2**32 - 1), "seeds random weights, calibration and the evaluation split",
          flag="--seed"),
    Param("layers", 1, Integer(1, MAX_LAYERS), "average the patch tokens of the last LAYERS blocks",
          flag="--layers"),
    Param("coreset_ratio", 1.0, Number(0.0, 1.0, lo_open=True), "share of the good patches kept per location",
          flag="--coreset-ratio"),
    Param("tolerance", "auto", Checked(_tolerance, lambda t: t if t == "map" else int(t)), "a patch is compared "
          "with good patches up to this many grid steps away; 'map': a number for each place, measured at fit",
          auto=True, flag="--tolerance"),
    Param("match", "local", OneOf(MATCHES), "compare a patch with its own place, all places, or both",
          auto=True, flag="--match"),
    Param("bank_dtype", "float32", OneOf(("float32", "float16")), "storage of the memory bank"),
    Param("sigma", "auto", Number(0.0, MAX_SIGMA), "Gaussian smoothing of the anomaly map, in canonical pixels",
          auto=True, flag="--sigma"),
    Param("score", "auto", OneOf(SCORES), "image score from the anomaly map", auto=True, flag="--score"),
    Param("topk", 0.01, Number(0.0, 1.0, lo_open=True), "share of the map the 'topk' score averages"),
    Param("morph_kernel", 5, Integer(0, MAX_MORPH_KERNEL), "side of the defect mask's opening and closing"),
    Param("calibration", "cv", Checked(lambda v, p: check_calibration(v), _parse_calibration, standalone=True),
          "'cv': each good image scored against a bank without it; or a share of them held out"),
    Param("false_alarm_rate", 0.0, Checked(lambda v, p: check_rate(v), float, standalone=True),
          "the threshold is the 1 - RATE quantile of the good images' held-out scores (0: their maximum)",
          flag="--false-alarm-rate"),
    Param("threshold", None, Checked(_threshold, float, standalone=True),
          "a threshold to use instead of calibrating one"),
    Param("mirror", False, Flag(), "parts can lie on either face", flag="--mirror"),
    Param("foreground", "auto", Checked(lambda v, p: check_option(v, p["align"]), choices=("auto", "on", "off")),
          "run the backbone on the part's region only (aligned parts; auto: where it pays)", flag="--foreground",
          missing=False, flag_values={"on": True, "off": False}),
    Param("batch_size", 8, Integer(1, MAX_BATCH), "images per backbone call", runtime=True, flag="--batch-size"),
    Param("overlap", True, Flag(), "predict: read and align the next batch and post-process the last one while "
          "the backbone runs, in threads (--no-overlap: in turn, for a machine whose cores other work keeps busy)",
          runtime=True, flag="--no-overlap"),
    Param("progress", True, Flag(), "show progress bars", runtime=True),
    Param("device", "auto", Checked(_device), "auto, cpu, cuda or cuda:N; a GPU named but not there is an error",
          runtime=True, flag="--device"),
    # Model files from before the good-set check kept every image they were given.
    Param("outliers", "drop", OneOf(OUTLIERS), "good images that are no evidence of a good part (no part, "
          "duplicates, held-out scores far above the rest): left out of the bank and the threshold, kept, or "
          "an error", flag="--outliers", missing="keep"),
    # Model files from before registration resized fixtured frames as they came.
    Param("register", "auto", Checked(lambda v, p: check_register(v, p["align"]), choices=MODES),
          "fixtured frames (--no-align): shift each onto the good parts' place; auto: where that explains how the "
          "good frames differ, not on textures", flag="--register", missing="off"),
    # Model files from before the pose judgement hold an aligner of an older state, refused on load anyway.
    Param("size_tolerance", 0.03, Number(0.0, 1.0, hi_open=True), "aligned parts whose size is off the good "
          "parts' median by more than this (relative), or than their own spread, are anomalies; widen it where "
          "the camera's distance varies", flag="--size-tolerance"),
    # Model files from before update kept no good parts.
    Param("keep_parts", True, Flag(), "keep the good parts in the model file, for update (--no-keep-parts: a "
          "smaller file that cannot be updated)", flag="--no-keep-parts", missing=False),
)


def table() -> dict[str, Param]:
    """``name -> Param``, in declaration order."""
    return {p.name: p for p in PARAMS}


def defaults() -> dict:
    return {p.name: p.default for p in PARAMS}


def runtime_names() -> tuple[str, ...]:
    return tuple(p.name for p in PARAMS if p.runtime)


def check(params: dict) -> dict:
    """Validated, JSON-able copy of ``params``; ValueError naming the first bad or unknown one.

    Checked in the table's order, so a rule may read the parameters above it. A
    parameter absent from ``params`` (a model file older than it) takes its
    ``missing`` value.
    """
    unknown = sorted(set(params) - set(table()))
    if unknown:
        raise ValueError(f"unknown parameters {unknown}; valid: {list(table())}")
    out: dict = {}
    for p in PARAMS:
        value = params[p.name] if p.name in params else p.legacy
        if p.auto and isinstance(value, str) and value == "auto":
            out[p.name] = value
            continue
        try:
            out[p.name] = p.rule.check(p.name, value, out)
        except ValueError as e:
            if p.auto and isinstance(value, str):  # 'AUTO', 'auto ': say that 'auto' exists
                raise ValueError(f"{e}; {p.name} may also be 'auto'") from None
            raise
    return out


# ----------------------------------------------------------------------------- command-line flags

def _arg_type(p: Param):
    """An argparse type for ``p``: text to value, with the rule's checks that need no other parameter."""
    words = p.flag_values or {}

    def parse(text: str):
        if p.auto and text == "auto":
            return text
        if text in words:
            return words[text]
        try:
            value = p.rule.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {_kind(p)}") from None
        if p.rule.standalone:
            try:
                p.rule.check(p.name, value, {})
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        return value
    return parse


def _kind(p: Param) -> str:
    parse = getattr(p.rule, "parse", None)
    what = "an integer" if isinstance(p.rule, Integer) or parse is int else \
        "a number" if isinstance(p.rule, Number) or parse is float else "a valid value"
    return what + (" or 'auto'" if p.auto else "")


def add_flags(parser, names, *, defaults: dict | None = None, group: str | None = None,
              default_note: str = "", helps: dict | None = None) -> None:
    """Add the flags of the parameters ``names`` (those with a flag) to ``parser``.

    Args:
        defaults: defaults other than the table's (None: the value comes from elsewhere, say where in
            ``default_note``).
        group: the title of an argument group to put them in.
        default_note: appended to each help, e.g. " (default: the model file's)".
        helps: helps other than the table's, by name (a command that takes fewer values says which).
    """
    target = parser.add_argument_group(group) if group else parser
    defaults, helps = defaults or {}, helps or {}
    for name in names:
        p = table()[name]
        if p.flag is None:
            continue
        default = defaults.get(name, p.default)
        text = helps.get(name, p.help) + default_note
        if isinstance(p.rule, Flag):
            action = "store_false" if p.flag.startswith("--no-") else "store_true"
            target.add_argument(p.flag, dest=name, action=action, default=default, help=text)
            continue
        kw: dict = {"dest": name, "default": default, "help": text}
        options = p.rule.choices
        if options is not None:
            kw["choices"] = tuple(options) if not p.auto else ("auto", *options)
            if p.flag_values:
                kw["type"] = str
        else:
            kw["type"] = _arg_type(p)
        target.add_argument(p.flag, **kw)


def from_flags(args: argparse.Namespace, names) -> dict:
    """The parameters ``names`` as given on the command line (flag words turned to values; None left out)."""
    out = {}
    for name in names:
        p = table()[name]
        if p.flag is None or getattr(args, name, None) is None:
            continue
        value = getattr(args, name)
        out[name] = (p.flag_values or {}).get(value, value) if isinstance(value, str) else value
    return out


def parse_value(name: str, text: str):
    """A parameter's value from text (``benchmark-quality -p NAME=VALUE``); ValueError for an unknown name."""
    if name not in table():
        raise ValueError(f"unknown parameter {name!r}; valid: {list(table())}")
    p = table()[name]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # a quoted string: -p score='p99'
        text = text[1:-1]
    if isinstance(p.rule, Flag):
        if text not in ("True", "False"):
            raise ValueError(f"{name} must be True or False, got {text!r}")
        return text == "True"
    if text == "None" and p.default is None:
        return None
    try:
        return _arg_type(p)(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{name}: {e}") from None


__all__ = ["MAX_BATCH", "MAX_IMAGE_SIZE", "MAX_LAYERS", "PARAMS", "Checked", "Flag", "Integer", "Number",
           "OneOf", "Param", "add_flags", "check", "defaults", "from_flags", "parse_value", "runtime_names", "table"]
