"""The service's memory budget: sizes parsed strictly, the resident-size estimate, least recently used dropped
beyond the budget, a model larger than the budget refused where it is first seen."""
import asyncio
import os

import pytest
from conftest import FAST, screws

from dinopatch import DinoPatch
from dinopatch.catalog import ModelVersion, check_version
from dinopatch.loaded_models import LoadedModels, ModelUnavailableError
from dinopatch.memory_budget import MemoryBudgetError, engine_bytes, file_members_bytes, format_size, parse_size
from dinopatch.serve import ServiceConfig, main

MB = 10**6


@pytest.mark.parametrize("text, size", [("2GB", 2 * 10**9), ("1.5GiB", 3 * 2**29), ("512 mb", 512 * MB),
                                        ("800MiB", 800 * 2**20), ("4096B", 4096), (" 1tb ", 10**12)])
def test_sizes_are_a_number_and_a_unit(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["2", "2G", "GB", "-1GB", "0GB", "1e9B", "2GB ram", "two GB", "", "0.1B", "1,5GB"])
def test_anything_else_is_refused_saying_what_a_size_is(text):
    with pytest.raises(ValueError, match="number and a unit, such as 2GB|at least 1 byte"):
        parse_size(text)


def test_format_size():
    assert (format_size(3 * 2**29), format_size(512), format_size(2048)) == ("1.5 GiB", "512 B", "2.0 KiB")


def _version(name: str, number: int, size: int) -> ModelVersion:
    return ModelVersion(name, number, f"id-{name}-{number}", f"s{number}", "", None, "c", {"resident_bytes": size})


def _batch(f):
    async def one(item):
        [out] = await f([item])
        return out
    return one


def test_least_recently_used_dropped_beyond_the_memory_budget():
    loads = []

    def load(version):
        loads.append(version.name)
        return version.model_id

    async def scenario():
        models = LoadedModels(load, _batch, max_models=10, memory=100 * MB)
        for name in ("a", "b", "c"):  # 30 MB each: 90 MB fits
            await models.get(_version(name, 1, 30 * MB))
        await models.get(_version("a", 1, 30 * MB))  # a is the most recent now, b the least
        assert models.names() == ["b", "c", "a"] and models.resident_bytes() == 90 * MB
        await models.get(_version("d", 1, 50 * MB))  # needs 40 MB freed: b and c go, a stays
        assert models.names() == ["a", "d"] and models.resident_bytes() == 80 * MB
        # A swap holds both versions while the new one loads; the old goes once the new is in.
        await models.get(_version("d", 2, 60 * MB))
        assert models.names() == ["d"] and models.resident_bytes() == 60 * MB
        # Larger than the whole budget: refused before anything is loaded or dropped.
        with pytest.raises(ModelUnavailableError, match="MemoryBudgetError: .*more than the memory budget of 95.4 MiB"):
            await models.get(_version("huge", 1, 101 * MB))
        assert models.names() == ["d"] and "huge" not in loads
        # Exactly the budget fits, alone.
        await models.get(_version("e", 1, 100 * MB))
        assert models.names() == ["e"]

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="memory must be >= 1 byte"):
        LoadedModels(load, _batch, max_models=1, memory=0)


def test_the_estimate_counts_the_file_the_engine_and_a_batch(onnx_model):
    model, onnx = onnx_model
    data = open(model, "rb").read()
    runtime = {"engine": str(onnx), "kernel": "auto", "batch_size": 8}
    det, checks = check_version("screw", data, runtime)
    size = checks["resident_bytes"]
    engine = det.backbone_for()
    assert size == file_members_bytes(data) + engine_bytes(engine, 8)
    assert file_members_bytes(data) > len(data) // 2 and engine_bytes(engine, 8) > os.path.getsize(onnx)
    # 112 px, ViT-S/14: 64 tokens of 384 channels, 6 heads; 4 bytes a value, 8 images.
    assert engine_bytes(engine, 8) - int(1.25 * os.path.getsize(onnx)) == 4 * 8 * (64 * 384 * 10 + 6 * 64**2)
    with pytest.raises(MemoryBudgetError, match="screw: the model needs about"):
        check_version("screw", data, runtime, memory=size - 1)
    assert check_version("screw", data, runtime, memory=size)[1]["resident_bytes"] == size


def test_the_command_takes_memory_strictly_and_refuses_a_model_larger_than_it(onnx_model, capsys):
    import ray

    model, onnx = onnx_model
    with pytest.raises(SystemExit) as e:
        main([str(model), "--engine", str(onnx), "--memory", "2 gigs"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --memory: a memory size is a number and a unit, such as 2GB" in err
    with pytest.raises(SystemExit, match=r"screw: the model needs about .* more than the memory budget of 976.6 KiB"):
        main([str(model), "--engine", str(onnx), "--memory", "1MB"])
    assert not ray.is_initialized()  # refused before Ray starts
    for bad in (0, -5, 1.5, True, "2GB"):
        with pytest.raises(ValueError, match="memory must be a number of bytes"):
            ServiceConfig(models=model, engine=str(onnx), memory=bad)
    assert ServiceConfig(models=model, engine=str(onnx), memory=parse_size("2GB")).memory == 2 * 10**9


def test_a_replica_keeps_its_models_within_the_budget_and_answers_like_predict(onnx_model, tmp_path):
    """A scorer replica (in process, no Ray) with room for two of three models: each answer is ``predict``'s."""
    import cv2

    from dinopatch.catalog import ModelCatalog
    from dinopatch.serve import Scorer

    model, onnx = onnx_model
    files = {"screw": str(model)}
    for name, seed in (("bolt", 51), ("nut", 52)):
        files[name] = str(DinoPatch(**FAST).fit(screws("good", 4, seed=seed)).save(tmp_path / f"{name}.npz"))
    config = ServiceConfig(models=list(files.values()), engine=str(onnx), max_models=3)
    catalog = ModelCatalog(config.files, lambda name, data: (lambda d, c: (d.model_id, c))(
        *check_version(name, data, config.runtime)))
    sizes = sorted(catalog.current(n).resident_bytes for n in files)
    config.memory = sizes[-1] + sizes[-2]  # any two fit, never three
    scorer = Scorer(config)
    assert scorer.models.memory == config.memory
    # Ray Serve's batching runs only inside a deployment: here each request is its own batch.
    scorer.models = LoadedModels(scorer._load, _batch, config.max_models, config.memory)
    image = screws("good", 1, seed=53)[0]
    body = cv2.imencode(".png", image)[1].tobytes()

    async def scenario():
        held = []
        for name in ("screw", "bolt", "nut", "screw"):
            answer = await scorer.predict(catalog.current(name), body, None, False)
            assert answer["status"] == 200 and answer["body"]["model"] == name
            ref = DinoPatch.load(files[name], engine=str(onnx), progress=False).predict([image])[0]
            assert answer["body"]["score"] == pytest.approx(ref.score, rel=1e-5)
            assert scorer.models.resident_bytes() <= config.memory
            held.append(scorer.models.names())
        return held

    assert asyncio.run(scenario()) == [["screw"], ["screw", "bolt"], ["bolt", "nut"], ["nut", "screw"]]
    assert scorer.models.loads == 4
