"""ViT-S/14 backbone throughput: eager torch, ONNX Runtime fp32 and int8, OpenVINO (pytest-benchmark).

``pytest benchmarks/test_backbone_bench.py --benchmark-group-by=param:batch``;
``DINOPATCH_BENCH_SIZE=224`` for a quick run.  Targets (448 px, this CPU):
onnx fp32 >= 1.2x and onnx int8 >= 2x eager torch.
"""
import os

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from dinopatch.bench.stages.backbone import ENGINES, build_engines, sample_images  # noqa: E402

SIZE = int(os.environ.get("DINOPATCH_BENCH_SIZE", 448))


@pytest.fixture(scope="module")
def engines():
    return build_engines(SIZE)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("engine", ENGINES)
def test_backbone(benchmark, engines, engine, batch):
    if isinstance(engines[engine], str):
        pytest.skip(f"{engine}: {engines[engine]}")
    x = sample_images(batch, SIZE)
    benchmark.extra_info.update(image_size=SIZE, batch=batch, per_image="divide by batch")
    benchmark.pedantic(engines[engine], args=(x,), rounds=3, warmup_rounds=1)
