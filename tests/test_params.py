"""The parameter table drives the constructor, get_params, the checks at fit and load, and every command's flags."""
import argparse
import inspect
import json

import numpy as np
import pytest
from conftest import FAST, screws

from dinopatch import DinoPatch, modelfile, params
from dinopatch.backbone import ENGINES, TORCH_FREE_ENGINES, canonical_engine, make_backbone
from dinopatch.cli import build_parser
from dinopatch.fitted import check_params, load_detector
from dinopatch.modelfile import ModelFileError

HALO = params.Param("halo", 2, params.Integer(0, 5), "a parameter only this test knows", flag="--halo")


def test_constructor_stores_the_table_one_name_at_a_time():
    signature = inspect.signature(DinoPatch.__init__).parameters
    keywords = {n: p for n, p in signature.items() if n != "self"}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in keywords.values())
    assert list(keywords) == list(params.table())
    assert {n: p.default for n, p in keywords.items()} == params.defaults()
    assert DinoPatch().get_params() == params.defaults()
    # __init__ only stores: no loop over locals(), no check, no device probe.
    source = inspect.getsource(DinoPatch.__init__)
    assert "locals()" not in source and "require" not in source
    DinoPatch(device="cuda:7", tolerance="nonsense")


def test_defaults_pass_their_own_checks():
    assert check_params(params.defaults()) == params.defaults()


@pytest.fixture(scope="module")
def fitted_file(tmp_path_factory):
    det = DinoPatch(**FAST).fit(screws("good", 3, seed=1))
    return det.save(tmp_path_factory.mktemp("params") / "screw.npz")


def _with_params(path, tmp_path, edit) -> str:
    header, arrays = modelfile.read(path)
    header = json.loads(json.dumps({k: v for k, v in header.items() if k not in ("format", "version", "arrays")}))
    edit(header["params"])
    return modelfile.write(tmp_path / "edited.npz", header, arrays)


def test_a_parameter_added_to_the_table_is_seen_everywhere(monkeypatch, fitted_file, tmp_path, capsys):
    monkeypatch.setattr(params, "PARAMS", params.PARAMS + (HALO,))
    # get_params / set_params
    det = DinoPatch(**FAST).set_params(halo=3)
    assert det.get_params()["halo"] == 3
    # The checks at fit, before any work: the images given here are not even readable parts.
    with pytest.raises(ValueError, match=r"halo must be an integer in \[0, 5\], got 9"):
        det.set_params(halo=9).fit([np.zeros((8, 8), np.uint8)])
    # The model file's header: a file older than the parameter means its default; a bad value is refused.
    _, loaded = load_detector(fitted_file, {})
    assert loaded["halo"] == 2
    _, loaded = load_detector(_with_params(fitted_file, tmp_path, lambda p: p.update(halo=4)), {})
    assert loaded["halo"] == 4
    with pytest.raises(ModelFileError, match="halo must be an integer"):
        load_detector(_with_params(fitted_file, tmp_path, lambda p: p.update(halo=99)), {})
    # The command line: fit and evaluate take the flag, it is checked as it is read, and a model fixes it.
    parser = build_parser()
    assert parser.parse_args(["fit", "x.png", "-o", "m.npz", "--halo", "4"]).halo == 4
    assert parser.parse_args(["evaluate", "data"]).halo == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["fit", "x.png", "-o", "m.npz", "--halo", "9"])
    assert "halo must be an integer in [0, 5]" in capsys.readouterr().err
    from dinopatch.cli import _new_detector

    assert _new_detector(parser.parse_args(["fit", "x.png", "-o", "m.npz", "--halo", "1"])).halo == 1
    assert params.parse_value("halo", "5") == 5  # benchmark-quality -p halo=5


def test_unknown_parameter_in_a_model_file_is_refused(fitted_file, tmp_path):
    with pytest.raises(ModelFileError, match="unknown parameters .'halo'.: the file was written by a newer"):
        load_detector(_with_params(fitted_file, tmp_path, lambda p: p.update(halo=1)), {})


def test_every_flag_of_the_table_is_on_fit_and_run_time_ones_on_predict_and_the_services(capsys, tmp_path):
    from dinopatch import archive, serve

    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    fit = {a.dest for a in subs["fit"]._actions}
    predict = {a.dest for a in subs["predict"]._actions}
    assert {p.name for p in params.PARAMS if p.flag} <= fit
    assert {p.name for p in params.PARAMS if p.flag and p.runtime} <= predict
    assert not {p.name for p in params.PARAMS if not p.runtime} & predict
    for module, flags in ((serve, ("--engine", "--kernel")), (archive, ("--engine", "--kernel", "--batch-size"))):
        with pytest.raises(SystemExit):
            module.main(["-h"])
        text = capsys.readouterr().out
        assert all(flag in text for flag in flags), (module.__name__, text)
    # The service offers the registry's torch-free engines, OpenVINO included (the file is only looked up here).
    model = tmp_path / "m.npz"
    model.touch()
    assert serve.ServiceConfig(models=str(model), engine="openvino:fp32").engine == "openvino:fp32"
    with pytest.raises(ValueError, match="without torch"):
        serve.ServiceConfig(models=str(model), engine="torch:fp32")


def test_device_is_checked_at_fit_with_a_clear_error():
    det = DinoPatch(**FAST, device="gpu")
    with pytest.raises(ValueError, match="device 'gpu' must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        det.fit([np.zeros((8, 8), np.uint8)])


# ----------------------------------------------------------------------------- the engine registry

def test_one_registry_of_engine_names():
    assert ENGINES[0] == "auto" and {"onnx:fp32", "torch:fp32", "openvino:fp32"} <= set(ENGINES)
    assert "openvino:f32" not in ENGINES
    assert set(TORCH_FREE_ENGINES) == {e for e in ENGINES if e.split(":")[0] in ("onnx", "openvino")}
    for engine in ENGINES:
        assert canonical_engine(engine) == engine
    assert canonical_engine("model.onnx") == "model.onnx"
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'"):
        canonical_engine("tensorrt")
    # The command line takes every name the API takes (onnx:fp32 was refused).
    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    engine_type = next(a for a in subs["fit"]._actions if a.dest == "engine").type
    assert engine_type("onnx:fp32") == "onnx:fp32"


def test_old_spelling_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="'openvino:fp32'"):
        assert canonical_engine("openvino:f32") == "openvino:fp32"
    assert check_params(dict(params.defaults(), engine="openvino:f32"))["engine"] == "openvino:fp32"


def test_old_spelling_reaches_the_same_engine():
    pytest.importorskip("torch")
    pytest.importorskip("openvino")
    kw = dict(name="dinov2_vits14", weights="random", image_size=56)
    with pytest.warns(DeprecationWarning):
        old = make_backbone("openvino:f32", **kw)
    new = make_backbone("openvino:fp32", **kw)
    assert old.precision == new.precision == "fp32" and old.sha256 == new.sha256
