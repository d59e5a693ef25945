"""Published weights: the table, and downloads from a local HTTP server (127.0.0.1 only): a good
download, checksum mismatches, an interrupted download resumed, the cache, offline errors."""
from __future__ import annotations

import hashlib
import http.server
import socket
import threading

import numpy as np
import pytest

from fastmaskformer.cli import main
from fastmaskformer.config import list_presets
from fastmaskformer.convert import weights
from fastmaskformer.convert.weights import DownloadError, download


class _Server:
    """Serves ``files`` {path: bytes}; honours Range; ``cut`` {path: n}: the next GET of path
    announces the full length but sends only n bytes, then closes (an interrupted transfer)."""

    def __init__(self):
        self.files, self.cut, self.headers, self.requests = {}, {}, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                for k, v in server.headers.get(self.path, {}).items():
                    self.send_header(k, v)
                self.end_headers()
                n = server.cut.pop(self.path, None)
                self.wfile.write(body if n is None else body[:n])
                if n is not None:
                    self.wfile.flush()
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMASKFORMER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _blob(n=300_000, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _zoo_name(data: bytes) -> str:
    return f"/zoo/model_final_{hashlib.md5(data).hexdigest()[:6]}.pkl"


def test_table_covers_presets_and_is_honest():
    presets = set(list_presets())
    assert {w.preset for w in weights.WEIGHTS} <= presets and len(weights.WEIGHTS) == 18
    for w in weights.WEIGHTS:
        assert w.url.startswith("https://dl.fbaipublicfiles.com/maskformer/") and len(w.md5_prefix) == 6
        assert w.sha256 is None and w.size is None  # not published: never invented
    assert weights.weights_for("ade20k-150-swin-b").hf == "facebook/maskformer-swin-base-ade"
    assert weights.weights_for("mask2former-coco-instance-r50").md5_prefix == "3c8ec9"  # Mask2Former MODEL_ZOO.md
    assert weights.weights_for("mask2former-cityscapes-panoptic-r50").md5_prefix == "4ab90c"
    text = weights.weights_table()
    assert "model_final_d8dbeb.pkl" in text and "not published" in text
    assert weights.weights_table(markdown=True).count("\n") == len(weights.WEIGHTS) + 1


def test_weights_list_cli(capsys):
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "ade20k-full-847-r50" in out and "facebook/maskformer-resnet50-ade20k-full" in out


def test_good_download_and_cache(server, cache):
    data = _blob()
    name = _zoo_name(data)
    server.files[name] = data
    path = download(server.url + name, progress=False)
    assert path.read_bytes() == data and path.is_relative_to(cache)
    assert path.with_name(path.name + ".sha256").read_text().strip() == hashlib.sha256(data).hexdigest()
    assert not list(cache.rglob("*.part"))
    n = len(server.requests)
    assert download(server.url + name, progress=False) == path and len(server.requests) == n  # cached
    # a cached file that changed no longer matches its recorded sha256: fetched again
    path.write_bytes(b"tampered")
    assert download(server.url + name, progress=False).read_bytes() == data and len(server.requests) == n + 1


def test_checksum_mismatch(server, cache):
    data = _blob(seed=1)
    server.files["/zoo/model_final_000000.pkl"] = data  # md5 prefix in the name does not match
    with pytest.raises(DownloadError, match="does not start with 000000"):
        download(server.url + "/zoo/model_final_000000.pkl", progress=False)
    server.files["/x/weights.bin"] = data
    with pytest.raises(DownloadError, match="sha256"):
        download(server.url + "/x/weights.bin", sha256="0" * 64, progress=False)
    with pytest.raises(DownloadError, match="size"):
        download(server.url + "/x/weights.bin", size=5, progress=False)
    server.files["/hf/model.safetensors"] = data
    server.headers["/hf/model.safetensors"] = {"X-Linked-Etag": '"' + "a" * 64 + '"'}  # the sha256 HF states
    with pytest.raises(DownloadError, match="expected a{64}"):
        download(server.url + "/hf/model.safetensors", progress=False)
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files == []  # nothing under a final name, no partial file kept from wrong bytes


def test_interrupted_download_resumes(server, cache):
    data = _blob(seed=2)
    name = _zoo_name(data)
    server.files[name] = data
    server.cut[name] = 100_000
    with pytest.raises(DownloadError, match="interrupted after 100000 of 300000 bytes; run again to resume"):
        download(server.url + name, progress=False)
    final = weights.cache_path(server.url + name)
    assert not final.exists() and final.with_name(final.name + ".part").stat().st_size == 100_000
    path = download(server.url + name, progress=False)
    assert path.read_bytes() == data
    assert server.requests[-1] == (name, "bytes=100000-")  # only the rest was fetched
    assert not final.with_name(final.name + ".part").exists()


def test_offline_is_one_line(cache, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/zoo/model_final_abcdef.pkl"
    assert main(["convert", "--from", "detectron2", url, "--preset", "ade20k-150-r50", "--out", "x.pt",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot fetch {url}" in err


def test_convert_detectron2_url_downloads_then_converts(server, cache, tmp_path, capsys):
    """The downloaded file reaches the converter (a pickle without the model's tensors: its
    one-line complaint shows it was read)."""
    import pickle

    data = pickle.dumps({"model": {"sem_seg_head.predictor.class_embed.weight": np.zeros((151, 256), np.float32)}})
    name = _zoo_name(data)
    server.files[name] = data
    rc = main(["convert", "--from", "detectron2", server.url + name, "--preset", "ade20k-150-r50",
               "--out", str(tmp_path / "x.pt"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "x.pt" not in err
    assert weights.cache_path(server.url + name).read_bytes() == data


def test_convert_hf_name(server, cache, tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    from test_convert_hf import _hf_model

    hf = _hf_model("resnet")
    hf.save_pretrained(tmp_path / "saved")
    for f in (tmp_path / "saved").iterdir():
        server.files[f"/facebook/tiny-maskformer/resolve/main/{f.name}"] = f.read_bytes()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    out = tmp_path / "model.pt"
    assert main(["convert", "--from", "hf", "facebook/tiny-maskformer", "--out", str(out), "--no-progress"]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["convert", "--from", "hf", "facebook/absent-model", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent-model/resolve/main/config.json" in err[0] and "404" in err[0]


def test_readme_table_is_the_code_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert weights.weights_table(markdown=True) in readme
