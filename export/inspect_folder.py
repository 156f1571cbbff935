"""A torch-free line template: score every image of a folder through the line runtime, one JSON line each.

Usage: python export/inspect_folder.py MODEL.npz GRAPH.onnx FOLDER
"""
import json
import sys
from pathlib import Path

from dinopatch import DinoPatch
from dinopatch.stream import stream


def main() -> None:
    model, graph, folder = sys.argv[1:4]
    det = DinoPatch.load(model, engine=graph, progress=False)
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    for path, frame in zip(paths, stream(det, paths)):
        r = frame.result
        print(json.dumps({"path": str(path), "score": r.score, "is_anomaly": bool(r.is_anomaly),
                          "aligned": r.aligned, "reason": r.alignment.reason, "threshold": r.threshold,
                          "threshold_source": r.threshold_source, "latency_ms": round(frame.latency * 1e3, 2)}))


if __name__ == "__main__":
    main()
