"""The ISIC 2018 download helper, against a local HTTP server (no external network in tests)."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinlesion.data import download as dl
from skinlesion.data.layouts import load_records
from skinlesion.errors import ConfigError, DataError

TEST_IMAGES = {"ISIC_0034524": "df", "ISIC_0034525": "mel", "ISIC_0034526": "nv"}


def isic_test_archives(folder: Path) -> dict[str, bytes]:
    """The two ISIC 2018 Task 3 test archives, tiny: three noisy JPEGs (so the input zip is a few KB)."""
    rng = np.random.default_rng(0)
    inputs, truth = io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(inputs, "w") as bundle:
        for image_id in TEST_IMAGES:
            jpeg = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (60, 80, 3), np.uint8)).save(jpeg, "JPEG")
            bundle.writestr(f"ISIC2018_Task3_Test_Input/{image_id}.jpg", jpeg.getvalue())
        bundle.writestr("ISIC2018_Task3_Test_Input/LICENSE.txt", "CC-BY-NC")
    columns = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    frame = pd.DataFrame([{"image": i, **{c: float(c.lower() == d) for c in columns}} for i, d in TEST_IMAGES.items()])
    with zipfile.ZipFile(truth, "w") as bundle:
        bundle.writestr(
            "ISIC2018_Task3_Test_GroundTruth/ISIC2018_Task3_Test_GroundTruth.csv", frame.to_csv(index=False)
        )
    files = {
        "ISIC2018_Task3_Test_Input.zip": inputs.getvalue(),
        "ISIC2018_Task3_Test_GroundTruth.zip": truth.getvalue(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` with HTTP Range support; ``server.cut`` bytes into a file, drops the first reply."""

    def do_GET(self) -> None:
        data = self.server.files.get(self.path.rsplit("/", 1)[-1])
        self.server.requests.append((self.path, self.headers.get("Range")))
        if data is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.server.cut and not start:
            body, self.server.cut = body[: self.server.cut], 0  # the connection drops part-way, once
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[http.server.HTTPServer]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.files, httpd.requests, httpd.cut = isic_test_archives(tmp_path), [], 0
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/2018"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_downloads_verifies_and_unpacks_into_the_layout_the_loader_reads(server, tmp_path: Path) -> None:
    out = tmp_path / "ISIC2018"
    result = dl.download(out, parts=["test"], base_url=server.url)
    records = load_records(out, "auto", "Test")
    assert dict(zip(records["image_id"], records["dx"])) == TEST_IMAGES
    archive = server.files["ISIC2018_Task3_Test_Input.zip"]
    entry = result["files"]["ISIC2018_Task3_Test_Input.zip"]
    assert entry["bytes"] == len(archive) and entry["sha256"] == hashlib.sha256(archive).hexdigest()
    assert not list(out.glob("*.zip")) and not list(out.glob("*.part"))  # archives removed after unpacking
    requests = len(server.requests)
    dl.download(out, parts=["test"], base_url=server.url)  # everything there: nothing fetched again
    assert len(server.requests) == requests


def test_an_interrupted_download_resumes_where_it_stopped(server, tmp_path: Path) -> None:
    out = tmp_path / "ISIC2018"
    size = len(server.files["ISIC2018_Task3_Test_Input.zip"])
    server.cut = size // 3
    with pytest.raises(DataError, match=r"ISIC2018_Task3_Test_Input.zip: got [0-9,]+ bytes, expected .* run again"):
        dl.download(out, parts=["test"], base_url=server.url)
    partial = out / "ISIC2018_Task3_Test_Input.zip.part"
    assert partial.stat().st_size == size // 3
    result = dl.download(out, parts=["test"], base_url=server.url)
    assert server.requests[-2] == ("/2018/ISIC2018_Task3_Test_Input.zip", f"bytes={size // 3}-")
    assert result["files"]["ISIC2018_Task3_Test_Input.zip"]["resumed_at"] == size // 3
    assert len(load_records(out, "isic2018", "Test")) == 3


def test_a_checksum_mismatch_is_refused_and_the_file_deleted(server, tmp_path: Path) -> None:
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'0' * 64}  ISIC2018_Task3_Test_Input.zip\n")
    with pytest.raises(DataError, match=r"sha256 [0-9a-f]{64} does not match the expected 0000"):
        dl.download(tmp_path / "out", parts=["test"], base_url=server.url, checksums=sums)
    assert not list((tmp_path / "out").glob("ISIC2018_Task3_Test_Input.zip*"))
    good = hashlib.sha256(server.files["ISIC2018_Task3_Test_Input.zip"]).hexdigest()
    sums.write_text(f"{good} *ISIC2018_Task3_Test_Input.zip\n")
    dl.download(tmp_path / "out", parts=["test"], base_url=server.url, checksums=sums)


def test_no_network_says_so_and_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataError, match=r"no network: cannot reach 127.0.0.1:\d+ .*on a machine with internet"):
        dl.download(tmp_path, parts=["validation"], base_url=f"http://127.0.0.1:{port}/2018", timeout=5)


def test_http_errors_archives_escaping_the_folder_and_unknown_parts(server, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"answered HTTP 404"):
        dl.download(tmp_path / "a", parts=["validation"], base_url=server.url)
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as bundle:
        bundle.writestr("../../outside.txt", "x")
    server.files["ISIC2018_Task3_Test_Input.zip"] = evil.getvalue()
    with pytest.raises(DataError, match=r"member '../../outside.txt' would be written outside"):
        dl.download(tmp_path / "b", parts=["test"], base_url=server.url)
    assert not (tmp_path / "outside.txt").exists()
    with pytest.raises(ConfigError, match=r"unknown parts train; choose from training, validation, test"):
        dl.download(tmp_path, parts=["train"])


def test_command_line(server, tmp_path: Path, capsys) -> None:
    dl.main([f"out={tmp_path / 'isic'}", "parts=[test]", f"base_url={server.url}"])
    assert "ISIC 2018 Task 3 ready in" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        dl.main(["output=/tmp"])
    assert exit_info.value.code == 2
    assert "error: unknown option(s) output" in capsys.readouterr().err
