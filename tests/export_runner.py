"""Runs a file written by ``fastmaskformer export`` in a process that cannot import
fastmaskformer (the deployment contract of README "Deploy"). Not a test module.

    python export_runner.py MODEL.pt2|MODEL.onnx INPUTS.npz OUTPUTS.npz

INPUTS.npz holds ``image<i>`` (uint8 [3, h, w]) and ``size<i>`` (int64 [2]) for i < ``n``;
OUTPUTS.npz gets ``out<i>_<j>`` (output j of image i) and ``metadata`` (the embedded JSON).
"""
import importlib.abc
import sys


class _NoFastMaskFormer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastmaskformer" or name.startswith("fastmaskformer."):
            raise ImportError(f"{name} imported while running an exported program")
        return None


sys.meta_path.insert(0, _NoFastMaskFormer())

import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main(model_path: str, inputs_path: str, outputs_path: str) -> None:
    data = np.load(inputs_path)
    if model_path.endswith(".pt2"):
        runner = torch._inductor.aoti_load_package(model_path)
        metadata = runner.get_metadata()["fastmaskformer"]

        def run(image, size):
            out = runner(torch.from_numpy(image), torch.from_numpy(size))  # semantic: one tensor
            return [t.numpy() for t in (out if isinstance(out, (list, tuple)) else [out])]
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        metadata = session.get_modelmeta().custom_metadata_map["fastmaskformer"]

        def run(image, size):
            return session.run(None, {"image": image, "output_size": size})
    out = {"metadata": np.array(metadata)}
    for i in range(int(data["n"])):
        for j, value in enumerate(run(data[f"image{i}"], data[f"size{i}"])):
            out[f"out{i}_{j}"] = value
    np.savez(outputs_path, **out)
    assert not any(m == "fastmaskformer" or m.startswith("fastmaskformer.") for m in sys.modules)
    print(json.loads(metadata)["task"])


if __name__ == "__main__":
    main(*sys.argv[1:4])
