"""The detector's stages and end-to-end predict (pytest-benchmark).

``pytest benchmarks/test_pipeline_bench.py --benchmark-only --benchmark-save=pipeline``;
``DINOPATCH_BENCH_SIZE=224`` for a quick run.  The same stages, with their
peers and targets, are in ``python -m dinopatch.bench pipeline``.
"""
import os

import pytest

from dinopatch import DinoPatch
from dinopatch.align import Aligner
from dinopatch.stream import stream
from dinopatch.synthetic import make_images

SIZE = int(os.environ.get("DINOPATCH_BENCH_SIZE", 448))


def _frames(n, seed):
    return make_images("screw", "good", n, seed)


@pytest.fixture(scope="module")
def frames():
    return _frames(8, seed=2)


@pytest.fixture(scope="module", params=["torch", "auto"])
def detector(request):
    det = DinoPatch(weights="random", image_size=SIZE, engine=request.param, progress=False)
    return det.fit(_frames(20, seed=1))


def test_align(benchmark, frames):
    aligner = Aligner(size=SIZE).fit(frames)
    benchmark(aligner.transform, frames[0])


def test_post(benchmark, detector, frames):
    raw = detector.patch_distances(frames[:1])[0]
    benchmark(detector.result_from, raw)


@pytest.mark.parametrize("batch", [1, 8])
def test_predict(benchmark, detector, frames, batch):
    detector.batch_size = batch
    benchmark.extra_info.update(image_size=SIZE, images=len(frames), per_image="divide by images")
    benchmark.pedantic(detector.predict, args=(frames,), rounds=3, warmup_rounds=1)


def test_stream(benchmark, detector, frames):
    benchmark.extra_info.update(image_size=SIZE, images=len(frames), per_image="divide by images")
    benchmark.pedantic(lambda: list(stream(detector, frames)), rounds=3, warmup_rounds=1)
