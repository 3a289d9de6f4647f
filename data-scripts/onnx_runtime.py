"""Run an ONNX model in onnxruntime: the independent runtime of the ONNX export tests.

    onnx_runtime.py check                       -> exit 0 and print the version if onnxruntime imports
    onnx_runtime.py run MODEL.onnx IN.npy OUT.npy [IN.npy OUT.npy ...]

`run` opens two CPU InferenceSessions: one with every graph optimisation off (what runs is the
graph as written) and one with onnxruntime's default (ORT_ENABLE_ALL: BN folded into convs,
fused kernels; what a deployment gets). It feeds each float32 input to the model's only input
and saves its only output, as OUT.npy (optimisations off) and OUT_opt.npy (default). It prints
one JSON line: the onnxruntime version, the input and output names and their declared shapes
(symbolic axes as strings), the opset, and the output shape of each run.

Used by crates/trainer/tests/onnx_export.rs. Needs onnxruntime (pinned by `cargo xtask setup`).
"""

import json
import sys

import numpy as np


def main(argv):
    import onnxruntime as ort

    if argv[1:] == ["check"]:
        print(ort.__version__)
        return 0
    if len(argv) < 5 or argv[1] != "run" or len(argv[3:]) % 2:
        sys.exit(__doc__)
    sessions = []
    for level in ["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"]:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        sessions.append(ort.InferenceSession(argv[2], opts, providers=["CPUExecutionProvider"]))
    sess = sessions[0]
    (inp,) = sess.get_inputs()
    (out,) = sess.get_outputs()
    runs = []
    pairs = argv[3:]
    for src, dst in zip(pairs[0::2], pairs[1::2]):
        x = np.load(src).astype(np.float32)
        for s, path in zip(sessions, [dst, dst[: -len(".npy")] + "_opt.npy"]):
            (y,) = s.run([out.name], {inp.name: x})
            np.save(path, y)
        runs.append(list(y.shape))
    meta = sess.get_modelmeta()
    print(
        json.dumps(
            {
                "onnxruntime": ort.__version__,
                "input": inp.name,
                "input_shape": inp.shape,
                "output": out.name,
                "output_shape": out.shape,
                "producer": meta.producer_name,
                "runs": runs,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
