"""The official model zoo per preset, and downloads into a local cache.

``WEIGHTS`` lists, for every preset with a published checkpoint, the Detectron2 ``.pkl`` of the
official MaskFormer model zoo (MODEL_ZOO.md; Mask2Former's MODEL_ZOO.md for the ``mask2former-``
rows listed so far) and, where one exists, the Hugging Face port.
Integrity: the zoo publishes the first 6 hex digits of each file's md5 in its name
(``model_final_d8dbeb.pkl``), which every download is checked against; sizes and sha256 are not
published and cannot be looked up offline, so they are ``None`` here: the first download records
the sha256 it computed beside the file (``<file>.sha256``) and every later use verifies the
cached file against it. Hugging Face serves the sha256 of its large files in ``X-Linked-Etag``;
when present it is checked too.

Downloads (``download``): into ``$FASTMASKFORMER_CACHE`` (default ``~/.cache/fastmaskformer``),
through ``<file>.part`` (resumed with an HTTP range request when a run was interrupted), verified,
then renamed to the final name, so a partial file never carries the final name. Failures are a
``DownloadError`` with one line naming what could not be fetched.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ENV_CACHE = "FASTMASKFORMER_CACHE"
ZOO = "https://dl.fbaipublicfiles.com/maskformer"
CHUNK = 1 << 20


class DownloadError(ValueError):
    """A download that failed, or a file that does not match its checksum (one line)."""


@dataclass(frozen=True)
class Weights:
    """One published checkpoint. ``url``: the official Detectron2 .pkl; ``md5_prefix``: the
    digits its name carries; ``size`` / ``sha256``: None where not published; ``hf``: the
    Hugging Face model with the same weights, or None."""

    preset: str
    url: str
    hf: str | None = None
    size: int | None = None
    sha256: str | None = None

    @property
    def md5_prefix(self) -> str | None:
        return md5_prefix_of(self.url)


def _zoo(preset: str, path: str, hf: str | None = None) -> Weights:
    return Weights(preset, f"{ZOO}/{path}", hf)


WEIGHTS = [
    _zoo("ade20k-150-r50", "semantic-ade20k/maskformer_R50_bs16_160k/model_final_d8dbeb.pkl",
         "facebook/maskformer-resnet50-ade"),
    _zoo("ade20k-150-r101", "semantic-ade20k/maskformer_R101_bs16_160k/model_final_1aeb94.pkl",
         "facebook/maskformer-resnet101-ade"),
    _zoo("ade20k-150-r101c", "semantic-ade20k/maskformer_R101c_bs16_160k/model_final_b432ea.pkl"),
    _zoo("ade20k-150-swin-t", "semantic-ade20k/maskformer_swin_tiny_bs16_160k/model_final_8657a5.pkl",
         "facebook/maskformer-swin-tiny-ade"),
    _zoo("ade20k-150-swin-s", "semantic-ade20k/maskformer_swin_small_bs16_160k/model_final_528157.pkl",
         "facebook/maskformer-swin-small-ade"),
    _zoo("ade20k-150-swin-b", "semantic-ade20k/maskformer_swin_base_IN21k_384_bs16_160k_res640/model_final_45388b.pkl",
         "facebook/maskformer-swin-base-ade"),
    _zoo("ade20k-150-swin-l", "semantic-ade20k/maskformer_swin_large_IN21k_384_bs16_160k_res640/model_final_aefa3b.pkl",
         "facebook/maskformer-swin-large-ade"),
    _zoo("ade20k-150-perpixel-r50", "semantic-ade20k/per_pixel_baseline_R50_bs16_160k/model_final_1043f3.pkl"),
    _zoo("ade20k-150-perpixelplus-r50", "semantic-ade20k/per_pixel_baseline_plus_R50_bs16_160k/model_final_833630.pkl"),
    _zoo("ade20k-full-847-r50", "semantic-ade20k-full/maskformer_R50_bs16_200k/model_final_f4e3f6.pkl",
         "facebook/maskformer-resnet50-ade20k-full"),
    # transformers' conversion script names a "maskformer-resnet50-coco-stuff" too; not confirmed
    # on the hub here, so not listed (facebook/maskformer-resnet101-coco-stuff is the R101 model)
    _zoo("coco-stuff-10k-r50", "semantic-coco-stuff-10k/maskformer_R50_bs32_60k/model_final_cb03eb.pkl"),
    _zoo("cityscapes-r101", "semantic-cityscapes/maskformer_R101_bs16_90k/model_final_38c00c.pkl",
         "facebook/maskformer-resnet101-cityscapes"),
    _zoo("mapillary-r50", "semantic-mapillary-vistas/maskformer_R50_bs16_300k/model_final_f3fc73.pkl",
         "facebook/maskformer-resnet50-vistas"),
    _zoo("coco-panoptic-r50", "panoptic-coco/maskformer_panoptic_R50_bs64_554k/model_final_6f60dc.pkl"),
    _zoo("coco-panoptic-swin-l", "panoptic-coco/maskformer_panoptic_swin_large_IN21k_384_bs64_554k/model_final_7505c4.pkl",
         "facebook/maskformer-swin-large-coco"),
    _zoo("ade20k-panoptic-r50", "panoptic-ade20k/maskformer_panoptic_R50_bs16_720k/model_final_7aa977.pkl"),
    # Mask2Former's model zoo (facebookresearch/Mask2Former MODEL_ZOO.md); no Hugging Face port of
    # these R50 models is known here
    _zoo("mask2former-coco-instance-r50", "mask2former/coco/instance/maskformer2_R50_bs16_50ep/model_final_3c8ec9.pkl"),
    _zoo("mask2former-cityscapes-panoptic-r50",
         "mask2former/cityscapes/panoptic/maskformer2_R50_bs16_90k/model_final_4ab90c.pkl"),
]


def weights_for(preset: str) -> Weights | None:
    return next((w for w in WEIGHTS if w.preset == preset), None)


def weights_table(markdown: bool = False) -> str:
    """The table of ``fastmaskformer weights list`` (and of the README with ``markdown``)."""
    rows = [("preset", "Detectron2 checkpoint (official model zoo)", "md5 prefix", "size", "sha256", "Hugging Face")]
    for w in WEIGHTS:
        rows.append((w.preset, w.url, w.md5_prefix or "-", str(w.size) if w.size else "not published",
                     w.sha256 or "not published", w.hf or "-"))
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(f"`{c}`" if i in (0, 5) and c != "-" else c for i, c in enumerate(r)) + " |"
                  for r in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows)


# ----------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """``$FASTMASKFORMER_CACHE``, else ``$XDG_CACHE_HOME/fastmaskformer``, else ``~/.cache/fastmaskformer``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "fastmaskformer"


def is_url(text: str) -> bool:
    return urllib.parse.urlparse(str(text)).scheme in ("http", "https")


def md5_prefix_of(url_or_name: str) -> str | None:
    """The md5 prefix a Detectron2 model-zoo file name carries (``model_final_d8dbeb.pkl``)."""
    m = re.search(r"model_final_([0-9a-f]{6})\.pkl$", str(url_or_name))
    return m.group(1) if m else None


def cache_path(url: str, cache: Path | None = None) -> Path:
    """Where ``url`` is kept: ``<cache>/downloads/<host>/<path>`` (only safe name characters)."""
    parsed = urllib.parse.urlparse(url)
    parts = [parsed.netloc.replace(":", "_")] + [p for p in parsed.path.split("/") if p not in ("", ".", "..")]
    parts = [re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in parts]
    if len(parts) < 2:
        raise DownloadError(f"{url} names no file")
    return (cache or cache_dir()).joinpath("downloads", *parts)


def _digests(path: Path, algorithms: tuple[str, ...]) -> dict[str, str]:
    """Hex digests of the file for each ``hashlib`` algorithm, in one read."""
    hashes = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            for h in hashes.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashes.items()}


def _verify(path: Path, what: str, size: int | None, sha256: str | None, md5_prefix: str | None) -> str:
    """The file's sha256 after checking every expectation given; DownloadError on a mismatch."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise DownloadError(f"{what}: size {actual_size} bytes, expected {size}")
    digests = _digests(path, ("sha256",) if md5_prefix is None else ("sha256", "md5"))
    if md5_prefix is not None and not digests["md5"].startswith(md5_prefix):
        raise DownloadError(f"{what}: md5 {digests['md5']} does not start with {md5_prefix} (the prefix in its name)")
    digest = digests["sha256"]
    if sha256 is not None and digest != sha256.lower():
        raise DownloadError(f"{what}: sha256 {digest}, expected {sha256}")
    return digest


# ----------------------------------------------------------------------------- download
def download(url: str, *, sha256: str | None = None, size: int | None = None, md5_prefix: str | None = None,
             cache: Path | None = None, progress: bool = True, timeout: float = 60.0) -> Path:
    """``url`` as a verified file in the cache (see the module docstring); returns its path.

    ``md5_prefix`` defaults to the one in a model-zoo file name. A cached file is checked against
    the sha256 recorded when it was downloaded (and ``sha256`` / ``size`` when given); a cached
    file that no longer matches is fetched again.
    """
    final = cache_path(url, cache)
    record = final.with_name(final.name + ".sha256")
    md5_prefix = md5_prefix if md5_prefix is not None else md5_prefix_of(url)
    if final.is_file():
        recorded = record.read_text().strip() if record.is_file() else None
        try:
            digest = _verify(final, f"cached {final}", size, sha256 or recorded, None)
            if not record.is_file():
                record.write_text(digest + "\n")
            return final
        except DownloadError as exc:
            print(f"warning: {exc}; downloading it again", file=sys.stderr)
            final.unlink()
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    served_sha = _fetch(url, part, progress, timeout)
    try:
        digest = _verify(part, f"download of {url}", size, sha256 or served_sha, md5_prefix)
    except DownloadError:
        part.unlink(missing_ok=True)  # wrong bytes: nothing to resume from
        raise
    tmp_record = record.with_name(record.name + ".tmp")
    tmp_record.write_text(digest + "\n")
    os.replace(part, final)
    os.replace(tmp_record, record)
    return final


def _fetch(url: str, part: Path, progress: bool, timeout: float) -> str | None:
    """Append the rest of ``url`` to ``part`` (a range request when ``part`` holds a start).
    Returns the sha256 the server states (Hugging Face's X-Linked-Etag), if any."""
    from tqdm import tqdm

    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "fastmaskformer"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part file is already complete
            return None
        raise DownloadError(f"cannot fetch {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot fetch {url}: {reason} (offline? download it by hand and pass the file's path)") from None
    with response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        etag = (response.headers.get("X-Linked-Etag") or response.headers.get("ETag") or "").strip('W/"')
        served_sha = etag.lower() if re.fullmatch(r"[0-9a-fA-F]{64}", etag) else None
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=Path(part.name).stem,
                   disable=not progress, leave=False)
        received = have
        try:
            with open(part, "ab" if have else "wb") as f:
                while True:
                    block = response.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
        except (OSError, ValueError) as exc:  # connection reset, http.client.IncompleteRead
            raise DownloadError(f"download of {url} interrupted after {received} bytes ({exc.__class__.__name__}); "
                                f"run again to resume") from None
        finally:
            bar.close()
    if total is not None and received < total:
        raise DownloadError(f"download of {url} interrupted after {received} of {total} bytes; run again to resume")
    return served_sha


# ----------------------------------------------------------------------------- Hugging Face
HF_FILES = ("config.json", "preprocessor_config.json")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def hf_endpoint() -> str:
    """``$HF_ENDPOINT`` (as huggingface_hub reads it), else https://huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def is_hf_name(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(text)) is not None


def download_hf(name: str, revision: str = "main", cache: Path | None = None, progress: bool = True) -> Path:
    """A Hugging Face model (``facebook/maskformer-swin-base-ade``) as a local folder holding
    config.json, preprocessor_config.json (when the model has one) and its weights."""
    base = f"{hf_endpoint()}/{name}/resolve/{revision}/"
    folder = (cache or cache_dir()) / "hf" / name.replace("/", "--") / revision
    folder.mkdir(parents=True, exist_ok=True)
    for file in HF_FILES:
        try:
            _link(download(base + file, cache=cache, progress=progress), folder / file)
        except DownloadError as exc:
            if file == "config.json" or "HTTP 404" not in str(exc):
                raise
    for file in HF_WEIGHTS:
        try:
            _link(download(base + file, cache=cache, progress=progress), folder / file)
            break
        except DownloadError as exc:
            if "HTTP 404" not in str(exc) or file == HF_WEIGHTS[-1]:
                raise
    return folder


def _link(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
