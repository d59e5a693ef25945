"""The ``fastmaskformer`` command: train, eval, predict, export, demo, bench, convert, weights, prepare, plot.

Configs are the presets of ``fastmaskformer.config`` (``--preset``) or YAML files (``--config``,
optionally ``preset: NAME`` plus overrides), then ``--set section.key=value`` (YAML values).
User mistakes (unknown preset, bad override, missing dataset or checkpoint, unreadable input)
print one line to stderr and exit with status 2; a non-finite loss stops training with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from .config import Config, get_config, list_presets


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------- config
def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("configuration")
    src = g.add_mutually_exclusive_group(required=required)
    src.add_argument("--config", metavar="FILE.yaml",
                     help="YAML config (all sections or a subset; 'preset: NAME' starts from a preset)")
    src.add_argument("--preset", metavar="NAME",
                     help=f"named preset (default: the checkpoint's config, else ade20k-150-r50): "
                          f"{', '.join(list_presets())}")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set solver.max_iter=1000 (repeatable; YAML values)")
    g.add_argument("--data-root", metavar="DIR",
                   help="datasets root (default: cfg.data.root or $FASTMASKFORMER_DATASETS)")


def build_config(args, base: Config | None = None) -> Config:
    """Config from --config / --preset (else ``base``, else the default preset), then --set, --data-root."""
    try:
        if getattr(args, "config", None):
            path = Path(args.config)
            if not path.is_file():
                raise UserError(f"config file {path} not found")
            cfg = Config.from_yaml(path.read_text())
        elif getattr(args, "preset", None):
            cfg = get_config(args.preset)
        else:
            cfg = base if base is not None else get_config()
        for assignment in getattr(args, "overrides", []):
            cfg.override(assignment)
    except yaml.YAMLError as exc:
        raise UserError(f"config is not valid YAML: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if getattr(args, "data_root", None):
        cfg.data.root = args.data_root
    return cfg


def _load_model(checkpoint: str, args, device: str):
    """(model in eval mode, Config) from a checkpoint; the config stored in it is the base."""
    from .engine.checkpoint import CheckpointError, load_checkpoint, load_model_weights
    from .modeling import build_model

    if not Path(checkpoint).is_file():
        raise UserError(f"checkpoint {checkpoint} not found")
    state = load_checkpoint(checkpoint)
    base = None
    if isinstance(state.get("config"), dict):
        try:
            base = Config.from_dict(state["config"])
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {checkpoint} has an invalid config: {exc}") from exc
        base.data.root = _stored_data_root(base.data.root, checkpoint)
    cfg = build_config(args, base)
    _check_model(cfg)
    model = build_model(cfg.model)
    load_model_weights(model, state["model"], checkpoint)
    return model.to(device).eval(), cfg


def _stored_data_root(root, checkpoint: str):
    """A checkpoint's data root: as stored when absolute or found from here; a relative one
    (checkpoints written before roots were stored absolute) else against the checkpoint's
    folder and each folder above it, the first that exists (the demo's run sits below its data)."""
    if not root or os.path.isabs(str(root)) or Path(root).expanduser().is_dir():
        return root
    for folder in Path(checkpoint).resolve().parents:
        if (folder / root).is_dir():
            return str(folder / root)
    return root


def _check_model(cfg: Config) -> None:
    """Reject an unknown architecture or backbone name before building anything."""
    from .modeling.backbone import resolve_backbone_name
    from .modeling.vit import resolve_vit_name

    archs = ("maskformer", "mask2former", "eomt", "per_pixel_baseline", "per_pixel_baseline_plus")
    if cfg.model.meta_arch not in archs:
        raise UserError(f"unknown model.meta_arch {cfg.model.meta_arch!r}; choose one of {', '.join(archs)}")
    try:
        (resolve_vit_name if cfg.model.meta_arch == "eomt" else resolve_backbone_name)(cfg.model.backbone.name)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def _device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return name


def _metadata(cfg: Config):
    """The dataset's metadata, or a generic one (class_0.., fixed palette) when it has none."""
    import numpy as np

    from .data import DatasetError, get_metadata
    from .data.metadata import Metadata

    try:
        return get_metadata(cfg.data.dataset, cfg.data.root)
    except (ValueError, DatasetError):
        k = cfg.model.num_classes
        rng = np.random.default_rng(0)
        colors = tuple(tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(k))
        return Metadata(cfg.data.dataset, tuple(f"class_{i}" for i in range(k)), tuple(range(k)),
                        (False,) * k, colors, cfg.data.ignore_label)


def _check_classes(model, cfg: Config, metadata, checkpoint: str) -> None:
    """One line (LabelSpaceError) when the checkpoint's classes are not the label space's."""
    from .data.metadata import check_label_space
    from .modeling import num_classes_of

    check_label_space(num_classes_of(model), metadata, f"checkpoint {checkpoint}", cfg.data.dataset)


def _checked_metadata(model, cfg: Config, checkpoint: str):
    """:func:`_metadata` of ``cfg``, checked against the model's number of classes."""
    metadata = _metadata(cfg)
    _check_classes(model, cfg, metadata, checkpoint)
    return metadata


# ----------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from .engine import Trainer
    from .engine.checkpoint import claim_run_folder

    cfg = build_config(args)
    _check_dataset(cfg)
    _check_model(cfg)
    if args.amp:
        cfg.solver.amp = True
    if args.compile:
        cfg.solver.compile = True
    if args.fsdp:
        cfg.solver.fsdp = True
    if args.activation_checkpointing:
        cfg.solver.activation_checkpointing = True
    _check_solver(cfg)
    resume = _resume_arg(args)
    if args.weights is not None and not Path(args.weights).is_file():
        raise UserError(f"--weights {args.weights}: no such checkpoint")
    if resume is None and os.environ.get("RANK", "0") == "0":  # rank 0 owns the folder
        claim_run_folder(args.output, args.force, "pass --resume to continue it, another --output,")
    trainer = Trainer(cfg, args.output, device=_device(args.device), resume=resume, weights=args.weights,
                      skip_nonfinite=args.skip_nonfinite, deterministic=args.deterministic,
                      progress=not args.no_progress, log_period=args.log_period, num_workers=args.num_workers)
    trainer.train()
    if trainer.dist.is_main:
        print(f"done: {trainer.iteration} iterations; checkpoints and metrics.jsonl in {args.output}")
    return 0


def _check_dataset(cfg: Config) -> None:
    from .data import DATASETS

    if cfg.data.dataset not in DATASETS:
        raise UserError(f"unknown dataset {cfg.data.dataset!r}; choose one of: {', '.join(sorted(DATASETS))}")
    if cfg.data.on_bad_sample not in ("error", "skip"):
        raise UserError(f"data.on_bad_sample must be error or skip, got {cfg.data.on_bad_sample!r}")
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise UserError(f"data.max_bad_fraction must be in [0, 1], got {cfg.data.max_bad_fraction}")


def _check_solver(cfg: Config) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.solver.grad_accum < 1 or cfg.solver.batch_size % (world * cfg.solver.grad_accum):
        raise UserError(f"solver.batch_size {cfg.solver.batch_size} must be divisible by the number of processes "
                        f"({world}) x solver.grad_accum ({cfg.solver.grad_accum})")
    from .engine.sharding import check_options

    try:
        check_options(cfg.solver, cfg.model.meta_arch, world)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _resume_arg(args):
    if args.resume not in (None, "auto") and not Path(args.resume).exists():
        raise UserError(f"--resume {args.resume}: no such checkpoint")
    return args.resume


def cmd_eval(args) -> int:
    from .data import build_dataset
    from .engine.distributed import init_distributed, is_main_process
    from .engine.evaluator import evaluate_dataset

    device = init_distributed(_device(args.device)).device  # under torchrun every rank takes a shard
    model, cfg = _load_model(args.checkpoint, args, device)
    _check_dataset(cfg)
    if args.tta and not cfg.test.aug_scales:
        # the official scales for 512 crops (256..896 step 128), relative to min_size_test
        cfg.test.aug_scales = tuple(int(x * cfg.data.min_size_test / 512) for x in range(256, 897, 128))
    cfg.test.aug_flip = cfg.test.aug_flip or args.tta
    dataset = build_dataset(cfg.data, args.split or cfg.data.val_split, train=False)
    _check_classes(model, cfg, dataset.metadata, args.checkpoint)
    results = evaluate_dataset(model, dataset, cfg, device=device, num_workers=args.num_workers,
                               batch_size=args.batch_size, amp=args.amp, progress=not args.no_progress)
    if not is_main_process():
        return 0
    for task, metrics in results.items():
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
        print(f"{task}: " + "  ".join(f"{k} {v:.2f}" for k, v in scalars.items()))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(results, indent=1))
        print(f"wrote {out / 'eval.json'}")
    return 0


def cmd_predict(args) -> int:
    from .engine.predictor import Predictor

    if (args.checkpoint is None) == (args.model is None):
        raise UserError("give either --checkpoint CKPT or --model FILE.pt2|FILE.onnx")
    if args.model is not None:  # an exported program: task, sizes and metadata come from the file
        from .engine.export import ExportedModel, ExportedPredictor, ExportError

        try:
            predictor = ExportedPredictor(ExportedModel(args.model), sem_ids=args.sem_ids)
        except (ExportError, ValueError) as exc:
            raise UserError(str(exc)) from exc
        tasks = args.task or [predictor.exported.task]
    else:
        device = _device(args.device)
        model, cfg = _load_model(args.checkpoint, args, device)
        try:
            predictor = Predictor(model, cfg, _checked_metadata(model, cfg, args.checkpoint), device=device,
                                  batch_size=args.batch_size, amp=args.amp, sem_ids=args.sem_ids)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        tasks = args.task or ["semantic"]
    try:
        written = predictor.predict_files(args.inputs, args.output, tasks=tasks)
    except (FileNotFoundError, ValueError) as exc:  # ValueError: an exported file asked for another task
        raise UserError(str(exc)) from exc
    failed = len(predictor.failures)
    if written:
        print(f"wrote {len(written)} files to {args.output}")
    if failed:
        done = "nothing written" if not written else f"the others are in {args.output}"
        print(f"fastmaskformer predict: {failed} image(s) could not be read ({done}): "
              + ", ".join(str(p) for p, _ in predictor.failures[:5]) + (" ..." if failed > 5 else ""), file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> int:
    from .engine.export import EXPORTABLE, EXPORTABLE_NAMES, FORMATS, TASKS, ExportError, export_program

    if args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r}; choose one of {', '.join(TASKS)}")
    if args.format is not None and args.format not in FORMATS:
        raise UserError(f"unsupported format {args.format!r}; choose one of {', '.join(FORMATS)}")
    if args.format is None:
        suffix = Path(args.output).suffix.lower().lstrip(".")
        if suffix not in ("pt2", "onnx"):
            raise UserError(f"--format is needed: cannot tell it from the suffix of {args.output} (.pt2 or .onnx)")
        args.format = suffix
    if args.device not in (None, "cpu") and args.format == "onnx":
        raise UserError("--device applies to --format pt2 only: an ONNX file is device-independent (export it on the "
                        "CPU, run it with onnxruntime's CUDA provider)")
    if Path(args.output).suffix.lower() != f".{args.format}":  # predict --model tells the format by it
        raise UserError(f"--output {args.output} must end in .{args.format} for --format {args.format}")
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise UserError(f"--format onnx needs the export extra ({exc.name} missing): "
                            "pip install 'fastmaskformer[export]'") from exc
    device = "cpu" if args.device is None else _device(args.device)
    model, cfg = _load_model(args.checkpoint, args, device)
    if cfg.model.meta_arch not in EXPORTABLE:
        raise UserError(f"checkpoint {args.checkpoint} is a {cfg.model.meta_arch} model; only "
                        f"{EXPORTABLE_NAMES} checkpoints can be exported")
    try:
        out = export_program(model, cfg, _checked_metadata(model, cfg, args.checkpoint), args.task, args.format,
                             args.output, device=device)
    except ExportError as exc:
        raise UserError(str(exc)) from exc
    print(f"wrote {out} ({args.format}, {args.task}, {device})")
    return 0


def cmd_demo(args) -> int:
    from .engine.demo import run_demo

    try:
        for assignment in args.overrides:
            Config().override(assignment)  # validate before generating data
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    run_demo(args.output or Path("demo_output") / args.arch, quick=args.quick, device=_device(args.device),
             progress=not args.no_progress, overrides=tuple(args.overrides), arch=args.arch, force=args.force)
    return 0


def _benchmarks_dir() -> Path | None:
    for candidate in (Path(__file__).resolve().parents[1] / "benchmarks", Path.cwd() / "benchmarks"):
        if candidate.is_dir():
            return candidate
    return None


def cmd_bench(args) -> int:
    bench_dir = _benchmarks_dir()
    if bench_dir is None or not (bench_dir / "run_all.py").is_file():
        raise UserError("no benchmarks/run_all.py found (run from a source checkout)")
    cmd = [sys.executable, str(bench_dir / "run_all.py")]
    if args.list:
        return subprocess.call(cmd + ["--list"])
    if args.only:
        cmd += ["--only", *args.only]
    if args.device:
        cmd += ["--device", args.device]
    if args.quick:
        cmd += ["--quick"]
    return subprocess.call(cmd)


def _convert_source(args) -> tuple[Path, str | None]:
    """(local file or folder, preset) for ``convert``: a path as given; a URL, a model-zoo preset
    name (detectron2) or a Hugging Face model name (hf) downloaded into the cache first."""
    from .convert import weights

    source, preset = args.source, args.preset
    if Path(source).exists():
        return Path(source), preset
    if args.from_format == "detectron2":
        entry = weights.weights_for(source)
        if entry is not None:  # a preset name: its official checkpoint
            source, preset = entry.url, preset or entry.preset
        elif source in list_presets():
            raise UserError(f"preset {source} has no official model-zoo checkpoint to download; presets with one: "
                            f"{', '.join(w.preset for w in weights.WEIGHTS)} (fastmaskformer weights list); for "
                            f"{source} give a local .pkl/.pth or its URL with --preset {source}")
        if weights.is_url(source):
            entry = next((w for w in weights.WEIGHTS if w.url == source), None)
            preset = preset or (entry.preset if entry else None)
            return weights.download(source, sha256=entry.sha256 if entry else None,
                                    size=entry.size if entry else None, progress=not args.no_progress), preset
    elif args.from_format == "eomt" and weights.is_url(source):
        return weights.download(source, progress=not args.no_progress), preset
    elif args.from_format == "hf" and (weights.is_url(source) or weights.is_hf_name(source)):
        name = source.split("huggingface.co/", 1)[-1] if weights.is_url(source) else source
        return weights.download_hf(name.strip("/"), progress=not args.no_progress), preset
    raise UserError(f"{source} not found (a local path, a URL{', a preset name' if args.from_format == 'detectron2' else ''}"
                    f"{' or a Hugging Face model name' if args.from_format == 'hf' else ''})")


def cmd_convert(args) -> int:
    from . import convert

    try:
        src, preset = _convert_source(args)
        if args.backbone and args.from_format != "eomt":
            raise UserError("--backbone is for --from eomt (the DINOv3 backbone of a DINOv3 EoMT checkpoint)")
        if args.from_format == "hf":
            cfg = convert.convert_hf_directory(src, args.out)
        elif args.from_format == "eomt":
            if not preset:
                raise UserError("convert --from eomt needs --preset NAME (the eomt-* preset of the checkpoint)")
            cfg = convert.convert_eomt_file(src, args.out, preset, args.backbone)
        else:
            if not preset:
                raise UserError("convert --from detectron2 needs --preset NAME (the architecture of the checkpoint)")
            cfg = convert.convert_detectron2_file(src, args.out, preset)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    print(f"wrote {args.out} ({cfg.model.backbone.name}, {cfg.model.num_classes} classes, "
          f"{cfg.model.num_queries} queries)")
    return 0


def cmd_prepare(args) -> int:
    from .data.prepare import NOT_NEEDED, prepare

    if args.dataset in NOT_NEEDED:
        print(f"{args.dataset} needs no preparation: the loader {NOT_NEEDED[args.dataset]}")
        return 0
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    root = args.root or os.environ.get("FASTMASKFORMER_DATASETS") or None  # None: in place, under --src
    try:
        outputs = prepare(args.dataset, args.src, root, jobs=args.jobs, progress=not args.no_progress)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    print(f"prepared {args.dataset}: " + ", ".join(str(p) for p in outputs))
    return 0


def cmd_weights(args) -> int:
    from .convert.weights import cache_dir, weights_table

    print(weights_table(markdown=args.markdown))
    if not args.markdown:
        print(f"\nsize/sha256 'not published': verified by the md5 prefix in the file name; the sha256 of the first "
              f"download is recorded in the cache ({cache_dir()}) and checked on every later use.\n"
              f"convert: fastmaskformer convert --from detectron2 PRESET_OR_URL --out CKPT, "
              f"or --from hf HF_NAME --out CKPT")
    return 0


def cmd_plot(args) -> int:
    from .engine.plot import PlottingUnavailable, plot_metrics

    src = Path(args.metrics)
    if src.is_dir():
        src = src / "metrics.jsonl"
    out = Path(args.out) if args.out else src.with_name("curves.png")
    try:
        plot_metrics(src, out)
    except (FileNotFoundError, ValueError, PlottingUnavailable) as exc:
        raise UserError(str(exc)) from exc
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastmaskformer", description="Train, evaluate and run MaskFormer (fastmaskformer).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def common_runtime(p, output_default, output_help):
        p.add_argument("--output", metavar="DIR", default=output_default, help=output_help)
        p.add_argument("--device", metavar="DEV", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
        p.add_argument("--amp", action="store_true", help="bf16 autocast for the model's forward pass")
        p.add_argument("--num-workers", type=int, default=None, metavar="N",
                       help="data-loading worker processes (default: cfg.data.num_workers)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("train", help="train a model (torchrun for several GPUs or nodes)",
                       description="Iteration-based training; checkpoints, config.yaml and metrics.jsonl go to "
                                   "--output. Multi-GPU: torchrun --nproc_per_node N -m fastmaskformer.cli train ...")
    _add_config_args(p)
    common_runtime(p, "output", "run folder for checkpoints and metrics (default: ./output)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue exactly from a checkpoint: a file, a run folder, or no value for the newest "
                        "checkpoint in --output")
    p.add_argument("--weights", metavar="CKPT",
                   help="fine-tune: start from this checkpoint's model weights (e.g. convert's output; its classes "
                        "must be the dataset's) at iteration 0 with a fresh optimiser; --resume wins over it")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model and the loss (solver.compile; the matcher's one host sync stays)")
    p.add_argument("--fsdp", action="store_true",
                   help="EoMT under torchrun: FSDP2, one shard unit per ViT block, instead of DDP (solver.fsdp; "
                        "checkpoints stay full state dicts; needs solver.eval_period=0)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="EoMT: recompute each ViT block in the backward pass (solver.activation_checkpointing)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip the update of an iteration with a NaN/inf loss or gradient instead of stopping")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (slower; exact reproducibility and resume)")
    p.add_argument("--log-period", type=int, default=20, metavar="N", help="log metrics every N iterations")
    p.add_argument("--force", action="store_true",
                   help="start a new run in an --output that holds another one (its checkpoints, metrics.jsonl "
                        "and config.yaml are deleted first; without --force it is refused)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint (mIoU, PQ)",
                       description="Evaluate on cfg.data.val_split; the checkpoint's stored config is the base "
                                   "unless --config/--preset is given.")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint file (.pt)")
    common_runtime(p, None, "folder for eval.json (default: print only)")
    p.add_argument("--split", default=None, help="dataset split (default: cfg.data.val_split)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="images per forward pass")
    p.add_argument("--tta", action="store_true", help="multi-scale + flip test-time augmentation (semantic)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="predict images or folders and write PNG/JSON results",
                       description="Any PIL-readable image (RGBA, grayscale, 16-bit, palette, JPEG ...); an unreadable "
                                   "one is a warning line, the others are still predicted, and the exit status is 1. "
                                   "Writes <stem>_sem.png (label ids, see --sem-ids) and <stem>_overlay.png; <stem>_panoptic.png "
                                   "(RGB-encoded ids) + panoptic.json; <stem>_instances.npz.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of images")
    _add_config_args(p)
    p.add_argument("--checkpoint", metavar="CKPT", help="checkpoint file (.pt)")
    p.add_argument("--model", metavar="FILE", help="an exported program (.pt2 or .onnx from 'fastmaskformer export') "
                                                   "in place of --checkpoint; same output files")
    common_runtime(p, "output", "folder for the predictions (default: ./output)")
    p.add_argument("--task", nargs="+", choices=("semantic", "panoptic", "instance"), default=None,
                   help="what to predict (default: semantic; with --model the file's task)")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="images per forward pass")
    p.add_argument("--sem-ids", choices=("dataset", "contiguous", "cityscapes-ids"), default="dataset",
                   help="ids in <stem>_sem.png: 'dataset' (default) as the dataset's ground truth stores them: "
                        "ADE20K 1..150 with 0 = other (class + 1), Cityscapes train ids (0..18), ADE20K-Full, "
                        "COCO-Stuff, Mapillary their training ids; 'contiguous': the model's class 0..K-1; "
                        "'cityscapes-ids': Cityscapes label ids (7 = road ... 33 = bicycle)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a checkpoint as a .pt2 (AOTInductor) or .onnx inference program",
                       description="One image (uint8 [3,h,w], test-resized) + its output size (int64 [2]) -> semantic "
                                   "labels, a panoptic id map and segment tables, or the top-N instance masks; runs "
                                   "without fastmaskformer (README 'Deploy'). MaskFormer and Mask2Former checkpoints.")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="checkpoint file (.pt) of a MaskFormer or Mask2Former")
    p.add_argument("--task", required=True, help="semantic, panoptic or instance")
    p.add_argument("--device", default=None,
                   help="cpu (default) or cuda: the device a .pt2 is compiled for and runs on (cuda keeps our Triton "
                        "deformable attention inside the package)")
    p.add_argument("--format", default=None, help="pt2 or onnx (default: from the --output suffix)")
    p.add_argument("--output", required=True, metavar="FILE", help="output file (.pt2 or .onnx)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="synthetic data -> train a small MaskFormer on the CPU -> mIoU/PQ summary",
                       description="Writes a synthetic dataset, trains a small MaskFormer for a few minutes, "
                                   "evaluates mIoU and PQ against a trivial baseline, writes overlays and curves.")
    p.add_argument("--output", metavar="DIR", default=None,
                   help="output folder (default: ./demo_output/ARCH, one per architecture)")
    p.add_argument("--force", action="store_true",
                   help="replace a previous demo run in --output (refused without --force)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (tests)")
    p.add_argument("--arch", choices=("maskformer", "mask2former", "eomt"), default="maskformer",
                   help="the architecture to train (default: maskformer)")
    p.add_argument("--device", metavar="DEV", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the demo config, e.g. --set solver.max_iter=600")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="run the benchmarks (benchmarks/run_all.py)",
                       description="Delegates to benchmarks/run_all.py: every part, or those named with --only.")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these parts")
    p.add_argument("--device", default=None, help="cuda or cpu")
    p.add_argument("--quick", action="store_true", help="small sizes")
    p.add_argument("--list", action="store_true", help="list the benchmark parts and exit")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("convert", help="convert Hugging Face, Detectron2 or EoMT weights to a checkpoint",
                       description="--from hf DIR_OR_NAME: a saved transformers MaskFormer, Mask2Former or EoMT "
                                   "folder (config.json + weights) or a Hugging Face model name "
                                   "(facebook/maskformer-swin-base-ade, tue-mps/coco_panoptic_eomt_large_640), "
                                   "downloaded; --from detectron2 FILE_URL_OR_PRESET [--preset NAME]: an official "
                                   "MaskFormer .pkl/.pth, its URL, or a preset name for its model-zoo checkpoint "
                                   "(fastmaskformer weights list); --from eomt FILE_OR_URL --preset NAME [--backbone PATH]: "
                                   "an official EoMT (tue-mps/eomt) pytorch_model.bin and its eomt-* preset; DINOv3 "
                                   "releases hold deltas and need the DINOv3 backbone they were fine-tuned from. "
                                   "Downloads go "
                                   "to $FASTMASKFORMER_CACHE (default ~/.cache/fastmaskformer), verified, resumable.")
    p.add_argument("--from", dest="from_format", choices=("hf", "detectron2", "eomt"), required=True,
                   help="source format")
    p.add_argument("source", metavar="SRC", help="local folder/file, URL, HF model name or (detectron2) preset name")
    p.add_argument("--out", required=True, metavar="CKPT", help="output checkpoint (.pt)")
    p.add_argument("--preset", metavar="NAME",
                   help="architecture preset (detectron2: default for a model-zoo URL: its preset; eomt: required)")
    p.add_argument("--backbone", metavar="PATH",
                   help="eomt, DINOv3 checkpoints: the DINOv3 ViT they were fine-tuned from: a transformers "
                        "DINOv3ViTModel folder (config.json + model.safetensors) or weights file, timm "
                        "vit_*_patch16_dinov3 weights (.safetensors/.pth) or Meta's original .pth")
    p.add_argument("--no-progress", action="store_true", help="no download progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("weights", help="the official model-zoo checkpoints per preset",
                       description="weights list: per preset the official Detectron2 checkpoint (URL, md5 prefix, "
                                   "size, sha256) and its Hugging Face model name.")
    p.add_argument("action", choices=("list",), help="list the published weights")
    p.add_argument("--markdown", action="store_true", help="as a markdown table")
    p.set_defaults(func=cmd_weights)

    from .data.prepare import NOT_NEEDED, PREPARERS

    p = sub.add_parser("prepare", help="convert a downloaded dataset into the layout the loaders read",
                       description="Writes what the official preparation scripts write (same files, names and "
                                   "values), idempotent and resumable. --src holds the downloads as the official "
                                   "datasets/README.md places them (SRC/ADE20K_2021_17_01, SRC/ADEChallengeData2016, "
                                   "SRC/coco/coco_stuff_10k, SRC/cityscapes). Needing no preparation: "
                                   + "; ".join(f"{k} ({v})" for k, v in NOT_NEEDED.items()) + ".")
    p.add_argument("dataset", choices=tuple(PREPARERS) + tuple(NOT_NEEDED), metavar="DATASET",
                   help=f"one of: {', '.join(PREPARERS)}")
    p.add_argument("--src", required=True, metavar="RAW_DIR", help="folder holding the downloaded releases")
    p.add_argument("--root", metavar="DATASETS",
                   help="datasets root to write (default: $FASTMASKFORMER_DATASETS, else --src itself)")
    p.add_argument("--jobs", type=int, default=None, metavar="N", help="worker processes (default: CPUs, at most 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("plot", help="plot loss / LR / mIoU curves from metrics.jsonl",
                       description="Reads a run's metrics.jsonl (or the run folder) and writes a PNG.")
    p.add_argument("metrics", metavar="METRICS", help="metrics.jsonl or the run folder holding it")
    p.add_argument("--out", metavar="PNG", help="output image (default: curves.png beside the metrics)")
    p.set_defaults(func=cmd_plot)
    return parser


# (module, exception) -> exit status: one line on stderr instead of a traceback. Looked up in
# sys.modules rather than imported, so parsing stays free of torch (an exception of a module
# that was never imported cannot have been raised).
_ONE_LINE_ERRORS = {
    ("fastmaskformer.data.errors", "DatasetError"): 2,
    ("fastmaskformer.data.metadata", "LabelSpaceError"): 2,
    ("fastmaskformer.engine.checkpoint", "CheckpointError"): 2,
    ("fastmaskformer.engine.trainer", "NonFiniteLossError"): 1,
}


def _exit_status(exc: BaseException) -> int | None:
    """The exit status of a user-facing error, None for anything else (a bug: a traceback)."""
    if isinstance(exc, UserError):
        return 2
    for (module, name), status in _ONE_LINE_ERRORS.items():
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return status
    return None


def main(argv=None) -> int:
    """Entry point of the ``fastmaskformer`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)  # light: --help and argument errors need no torch
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"fastmaskformer {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        status = _exit_status(exc)
        if status is None:
            raise
        print(f"fastmaskformer {args.command}: {'error: ' if status == 2 else ''}{exc}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
