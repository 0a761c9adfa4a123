"""Download the ISIC 2018 Task 3 archives and unpack them into the layout the DataModule reads.

    python -m skinlesion.data.download                                   # everything, where data=isic2018 looks
    python -m skinlesion.data.download out=/data/ISIC2018 parts=[test]   # only the official test set
    python -m skinlesion.data.download checksums=SHA256SUMS              # also verify sha256 sums

Each file is fetched from the ISIC challenge's public bucket into ``<name>.part`` and renamed when
complete; an interrupted download resumes where it stopped (HTTP Range) when run again. The size is
checked against the server's, the sha256 against a ``sha256sum``-format file when one is given, and
every file's size and sha256 are recorded in ``<out>/download.json``. Archives are unpacked (refusing
members that would land outside ``out``) into ``ISIC2018_Task3_<Subset>_Input/`` and
``..._GroundTruth/``, and deleted afterwards unless ``keep_archives=true``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
import zipfile
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from skinlesion import cli
from skinlesion.errors import ConfigError, DataError
from skinlesion.runfolder.files import read_json, write_json

log = logging.getLogger(__name__)

BASE_URL = "https://isic-challenge-data.s3.amazonaws.com/2018"
FILES = {
    "training": (
        "ISIC2018_Task3_Training_Input.zip",
        "ISIC2018_Task3_Training_GroundTruth.zip",
        "ISIC2018_Task3_Training_LesionGroupings.csv",
    ),
    "validation": ("ISIC2018_Task3_Validation_Input.zip", "ISIC2018_Task3_Validation_GroundTruth.zip"),
    "test": ("ISIC2018_Task3_Test_Input.zip", "ISIC2018_Task3_Test_GroundTruth.zip"),
}
MANIFEST = "download.json"
CHUNK = 1 << 20
OPTIONS = {"out", "parts", "base_url", "checksums", "keep_archives", "timeout"}
USAGE = (
    "usage: python -m skinlesion.data.download [out=DIR] [parts=[training,validation,test]] "
    "[checksums=SHA256SUMS] [keep_archives=false] [base_url=...] [timeout=60]"
)


def read_checksums(path: str | Path) -> dict[str, str]:
    """``name -> sha256`` from a ``sha256sum``-format file (``<hex>  <name>`` per line)."""
    sums = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            digest, _, name = line.strip().partition(" ")
            if len(digest) != 64 or not name.strip():
                raise ConfigError(f"{path} line {number}: expected '<sha256 hex>  <file name>'")
            sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _open(url: str, offset: int, timeout: float):
    request = Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    host = urlsplit(url).netloc
    try:
        return urlopen(request, timeout=timeout)
    except HTTPError as err:
        if err.code == 416 and offset:  # nothing left to send: the partial file is already complete
            return None
        raise DataError(f"{url}: the server answered HTTP {err.code} {err.reason}; check base_url") from err
    except (URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise DataError(
            f"no network: cannot reach {host} ({reason}). Download {url} on a machine with internet access "
            f"and put it in the output folder; this command then verifies and unpacks it"
        ) from err


def fetch(url: str, target: Path, timeout: float = 60, sha256: str | None = None) -> dict:
    """Download ``url`` to ``target``, resuming ``target.part``; size and checksum are verified."""
    partial = target.with_name(target.name + ".part")
    offset = partial.stat().st_size if partial.is_file() else 0
    response = _open(url, offset, timeout)
    total = offset
    if response is not None:
        with response:
            if response.status == 206:  # resumed: "Content-Range: bytes <start>-<end>/<total>"
                start, total = _content_range(response.headers.get("Content-Range", ""), url)
                if start != offset:
                    raise DataError(f"{url}: the server resumed at byte {start}, not {offset}; delete {partial}")
            else:  # 200: a server without Range support sends everything again
                offset, length = 0, response.headers.get("Content-Length")
                total = int(length) if length is not None else None
            if offset:
                log.info("resuming %s at %.1f MB", target.name, offset / 1e6)
            _stream(response, partial, offset, total, url)
    size = partial.stat().st_size
    if total is not None and size != total:
        raise DataError(
            f"{url}: got {size:,} bytes, expected {total:,}; the download was cut short, run again to resume"
        )
    digest = sha256_of(partial)
    if sha256 and digest != sha256.lower():
        partial.unlink()
        raise DataError(f"{url}: sha256 {digest} does not match the expected {sha256}; the file was deleted")
    os.replace(partial, target)
    return {"file": target.name, "url": url, "bytes": size, "sha256": digest, "resumed_at": offset or None}


def _content_range(header: str, url: str) -> tuple[int, int | None]:
    try:
        span, _, total = header.split(" ", 1)[1].partition("/")
        return int(span.split("-")[0]), None if total == "*" else int(total)
    except (IndexError, ValueError) as err:
        raise DataError(f"{url}: unreadable Content-Range '{header}' in a resumed download") from err


def _stream(response, partial: Path, offset: int, total: int | None, url: str) -> None:
    """Append the body to ``partial``; an interruption leaves what arrived, for the next run to resume."""
    received, last_log = offset, time.monotonic()
    with partial.open("ab" if offset else "wb") as handle:
        try:
            while block := response.read(CHUNK):
                handle.write(block)
                received += len(block)
                if time.monotonic() - last_log > 10:
                    last_log = time.monotonic()
                    share = f" ({received / total:.0%})" if total else ""
                    log.info("%s: %.1f MB%s", partial.name[: -len(".part")], received / 1e6, share)
        except (OSError, HTTPException) as err:  # connection reset, timeout, incomplete read
            handle.flush()
            raise DataError(
                f"{url}: interrupted after {received:,} bytes ({err}); run the command again to resume"
            ) from err


def unpack(archive: Path, out: Path) -> Path:
    """Extract ``archive`` into ``out/<archive stem>/``; a member escaping ``out`` is refused."""
    target = out / archive.stem
    staging = out / f".{archive.stem}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.namelist():
                if not (staging / member).resolve().is_relative_to(staging.resolve()):
                    raise DataError(f"{archive}: member '{member}' would be written outside {out}; refused")
            bundle.extractall(staging)
    except zipfile.BadZipFile as err:
        raise DataError(f"{archive}: not a valid zip archive ({err}); delete it and download again") from err
    entries = list(staging.iterdir())
    inner = entries[0] if len(entries) == 1 and entries[0].is_dir() and entries[0].name == archive.stem else None
    shutil.rmtree(target, ignore_errors=True)
    os.replace(inner or staging, target)  # the archives hold one top folder named like the archive
    shutil.rmtree(staging, ignore_errors=True)
    return target


def default_out() -> Path:
    """Where ``data=isic2018`` looks by default: $SKINLESION_ISIC_ROOT, else <project>/data/ISIC2018."""
    if os.environ.get("SKINLESION_ISIC_ROOT"):
        return Path(os.environ["SKINLESION_ISIC_ROOT"])
    return Path(os.environ.get("SKINLESION_HOME", ".")) / "data" / "ISIC2018"


def download(
    out: str | Path | None = None,
    parts: list[str] | tuple[str, ...] = ("training", "validation", "test"),
    base_url: str = BASE_URL,
    checksums: str | Path | None = None,
    keep_archives: bool = False,
    timeout: float = 60,
) -> dict:
    """Fetch, verify and unpack ``parts``; returns (and writes to ``<out>/download.json``) what was done."""
    unknown = [p for p in parts if p not in FILES]
    if unknown or not parts:
        raise ConfigError(f"unknown parts {', '.join(unknown) or '(none)'}; choose from {', '.join(FILES)}")
    sums = read_checksums(checksums) if checksums else {}
    out = Path(out).expanduser() if out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    for name in (name for part in parts for name in FILES[part]):
        local = out / name
        unpacked = out / local.stem if name.endswith(".zip") else local
        if name in manifest and unpacked.exists():
            log.info("%s: already downloaded (and unpacked)", name)
            continue
        if local.is_file():
            record = manifest.get(name) or {"file": name, "bytes": local.stat().st_size, "sha256": sha256_of(local)}
            if name in sums and record["sha256"] != sums[name]:
                raise DataError(f"{local}: sha256 {record['sha256']} does not match {sums[name]}; delete it")
        else:
            log.info("downloading %s/%s", base_url, name)
            record = fetch(f"{base_url.rstrip('/')}/{name}", local, timeout, sums.get(name))
        if name.endswith(".zip"):
            record["unpacked_to"] = str(unpack(local, out))
            if not keep_archives:
                local.unlink()
        manifest[name] = record
        write_json(manifest_path, manifest)  # after every file: an interrupted run keeps what it verified
    log.info("ISIC 2018 Task 3 (%s) is in %s; use data=isic2018 data.root=%s", ", ".join(parts), out, out)
    return {"out": str(out), "parts": list(parts), "files": manifest}


def main(argv: list[str] | None = None) -> None:
    options = cli.key_value_arguments(sys.argv[1:] if argv is None else argv, OPTIONS, USAGE)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if isinstance(options.get("parts"), str):
        options["parts"] = [options["parts"]]
    try:
        result = download(**options)
    except (DataError, ConfigError) as err:
        cli.fail(str(err))
    print(f"ISIC 2018 Task 3 ready in {result['out']} ({len(result['files'])} files)")


if __name__ == "__main__":
    main()
