"""Write the ONNX graph that matches a model file (run where torch is installed).

Usage: python export/export_for_model.py MODEL.npz OUT.onnx [--precision fp32|int8|fp16]
"""
import argparse

from dinopatch import DinoPatch
from dinopatch.backbone.onnx_export import export_onnx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8", "fp16"))
    args = p.parse_args()
    det = DinoPatch.load(args.model, engine="torch", progress=False)
    # DinoPatch.load refuses the graph later if these weights are not the model's.
    path = export_onnx(det.backbone, det.weights, det.image_size, det.layers, args.precision, args.out, det.seed)
    print(f"wrote {path}: run the model with DinoPatch.load({args.model!r}, engine={str(path)!r})")


if __name__ == "__main__":
    main()
