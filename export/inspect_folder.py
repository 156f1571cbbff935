"""A torch-free line template: score every image of a folder through the line runtime, one JSON line each.

Usage: python export/inspect_folder.py MODEL.npz GRAPH.onnx FOLDER

A frame that cannot be read (a file still being written, a damaged one) gets a
line with its ``error`` and the run goes on; the lines stay in file order.
"""
import collections
import json
import sys
from pathlib import Path

from dinopatch import DinoPatch
from dinopatch.data import read_image
from dinopatch.stream import stream


def main() -> None:
    model, graph, folder = sys.argv[1:4]
    det = DinoPatch.load(model, engine=graph, progress=False)
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    # The reader (stream's first stage, another thread) notes each path in order: a frame, or an error line.
    order = collections.deque()

    def frames():
        for path in paths:
            try:
                image = read_image(path)
            except (OSError, ValueError) as e:
                order.append((path, f"{type(e).__name__}: {e}"))
                continue
            order.append((path, None))
            yield image

    def errors_before_next_frame():
        while order and order[0][1] is not None:
            path, error = order.popleft()
            print(json.dumps({"path": str(path), "error": error}), flush=True)

    for frame in stream(det, frames()):
        errors_before_next_frame()
        path, _ = order.popleft()
        r = frame.result
        print(json.dumps({"path": str(path), "score": r.score, "is_anomaly": bool(r.is_anomaly),
                          "aligned": r.aligned, "reason": r.alignment.reason, "threshold": r.threshold,
                          "threshold_source": r.threshold_source, "latency_ms": round(frame.latency * 1e3, 2),
                          "error": None}), flush=True)
    errors_before_next_frame()


if __name__ == "__main__":
    main()
