"""Installs fastmaskformer, its Triton kernels (``kernels/`` as ``fastmaskformer.kernels``)
and the C++ batched Hungarian solver (``csrc/`` as ``fastmaskformer._C``).

The kernels' only source is the top-level ``kernels/`` directory. In a source checkout (and so in
an editable install) ``fastmaskformer/kernels/__init__.py`` is a shim that points the subpackage
at the ``kernels/`` of the same checkout; a built wheel holds the kernel modules themselves in
``fastmaskformer/kernels/`` (a namespace subpackage, without the shim). ``kernels/`` has no
``__init__.py`` so that it never shadows the PyPI package ``kernels`` from the checkout root.
"""
import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py


class KernelsBuildPy(build_py):
    """Take the modules of ``fastmaskformer.kernels`` from ``kernels/`` instead of the shim's folder."""

    def find_package_modules(self, package, package_dir):
        if package == "fastmaskformer.kernels":
            package_dir = "kernels"
        return super().find_package_modules(package, package_dir)

    def check_package(self, package, package_dir):
        if package == "fastmaskformer.kernels":
            return None  # no __init__.py by design (see the module docstring)
        return super().check_package(package, package_dir)


class OptionalBuildExt(build_ext):
    """Build the C++ extension, but never fail the install: without it the solver falls back
    to scipy with a warning (see ``fastmaskformer.ops.assignment``)."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing or broken
            print(f"WARNING: building fastmaskformer._C failed ({exc}); using the scipy fallback")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"WARNING: building {ext.name} failed ({exc}); using the scipy fallback")


def extensions():
    from pybind11.setup_helpers import Pybind11Extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    return [
        Pybind11Extension(
            "fastmaskformer._C",
            sources,
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ]


# pycocotools: the reference COCO mask codec and AP (binary manylinux wheels; needs only numpy);
# capped at the release the instance tests ran with, lower bound untested (APIs unchanged since 2.0)
INSTANCE = ["pycocotools>=2.0,<=2.0.11"]
EXPORT = ["onnx>=1.16,<=1.23.2", "onnxruntime>=1.17,<=1.32.0", "onnxscript>=0.2,<=0.7.2"]

setup(
    name="fastmaskformer",
    version="0.1.0",
    description="MaskFormer with fused Triton kernels and a batched C++ Hungarian solver",
    python_requires=">=3.10",
    packages=find_packages(include=["fastmaskformer", "fastmaskformer.*"]),
    package_data={"fastmaskformer": ["data/metadata/*.json", "data/prepare/*.json"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt, "build_py": KernelsBuildPy},
    # Upper bounds: the versions CI installs and tests. Lower bounds (not tested): the first
    # releases with the APIs we use (Triton 3.0: tl.dot input_precision, tl.range; so torch 2.4
    # and torchvision 0.19; timm 1.0).
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision>=0.19,<=0.29.1",
        "triton>=3.0,<=3.8.0",
        "timm>=1.0,<=1.0.31",
        "numpy",
        "scipy",
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",
        # the default engine of PQ files and COCO mask AP: the references' numbers (tested) at
        # 10-50x their speed; capped at the release the parity tests ran with
        "hotcoco>=1.3,<=1.3.0",
    ],
    extras_require={
        # the Hugging Face peer capped at the release CI tests: a new transformers can change
        # the model it converts from, or what it imports (5.25 brought the PyPI "kernels")
        "test": ["pytest", "hypothesis", "transformers<=5.25.0", "torchmetrics", "opencv-python-headless", "h5py",
                 *INSTANCE, *EXPORT],
        # COCO instance data (polygon / RLE decoding) and its mask AP (COCOeval)
        "instance": INSTANCE,
        # fastmaskformer prepare: the official ADE20K-Full resize (OpenCV), COCO-Stuff v7.3 .mat files
        "prepare": ["opencv-python-headless", "h5py"],
        # fastmaskformer export --format onnx and predict --model FILE.onnx (torch.onnx's dynamo
        # exporter needs onnxscript); capped at the releases the export tests ran with
        "export": EXPORT,
        # benchmarks/: the lapjv peer, pytest-benchmark timings, GPU clocks, the mIoU peer
        "bench": ["lap", "pytest-benchmark", "nvidia-ml-py", "torchmetrics"],
    },
    entry_points={"console_scripts": ["fastmaskformer=fastmaskformer.cli:main"]},
)
