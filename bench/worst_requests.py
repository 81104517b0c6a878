"""The worst requests the limits allow, against a real ``mmrec-serve`` process (issue 12, "Memory and CPU").

Starts ``python -m service.cli`` on a bundle (embedded mode, a temporary state directory, CPU), builds the most
expensive ``POST /v1/items`` bodies that every limit of ``ServiceSettings`` still accepts (read from the same
``MMREC_*`` environment the server gets), sends each ``--repeat`` times and reports per kind: status, wall time,
the server's CPU time, its peak RSS over the idle process (``VmHWM``, reset before each request through
``/proc/PID/clear_refs``, so no peak is missed between samples) and its RSS after the request over its RSS before.
Then the issue's reproduced cases, which must be refused (4xx) at no cost. Linux only (``/proc``).

    python bench/worst_requests.py --bundle var/bundles/ml100k-posters-lightgcn [--repeat 2] [--nice -15] [--out FILE]

A run on the development machine is kept in bench/results/worst_requests.{json,txt} (service/README.md, "Limits").

Goals (issue 12): every allowed request adds < 300 MB peak RSS over the idle process and returns within 5 s on a
2-core machine; RSS after the burst is within 50 MB of its level before. The table marks each; a shared machine's
load (printed) inflates wall times, which is why the server's CPU seconds are reported too.
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import math
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the settings class the server uses, so the limits are read the same way

import bundle_format as bf  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402

PEAK_GOAL_MB, TIME_GOAL_S, AFTER_GOAL_MB = 300.0, 5.0, 50.0
POSTER = (600, 900)  # width, height of a TMDB "w600" poster
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- the server process --------------------------------------------------------------------------------------


class Server:
    """``mmrec-serve`` in a child process, with its memory and CPU read from ``/proc``."""

    def __init__(self, bundle: Path, state_dir: Path, port: int, *, nice: int = 0) -> None:
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "service.cli", "--bundle", str(bundle), "--state-dir", str(state_dir),
                   "--port", str(port), "--device", "cpu", "--log-level", "warning"]
        if nice:
            command = ["nice", "-n", str(nice), *command]  # nice execs the server: same pid
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop(): it outlives this method)
        self.process = subprocess.Popen(command, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.proc = Path(f"/proc/{self.process.pid}")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"mmrec-serve exited with {self.process.returncode}:\n{self.log.read().decode()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"mmrec-serve not ready after {timeout_s:.0f} s")

    def _status(self, key: str) -> float:
        for line in (self.proc / "status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024  # kB -> MB
        raise RuntimeError(f"{key} not in /proc/PID/status")

    def rss_mb(self) -> float:
        return self._status("VmRSS:")

    def peak_mb(self) -> float:
        return self._status("VmHWM:")

    def reset_peak(self) -> None:
        (self.proc / "clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    def cpu_s(self) -> float:
        fields = (self.proc / "stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@contextmanager
def running_server(bundle: Path, port: int, timeout_s: float, *, nice: int = 0) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="worst-requests-") as state:
        server = Server(bundle, Path(state), port, nice=nice)
        try:
            server.wait_ready(timeout_s)
            yield server
        finally:
            server.stop()


# --- request bodies --------------------------------------------------------------------------------------------


@dataclass
class Request:
    kind: str
    what: str
    items: list[dict[str, Any]]
    expect: str = "201"  # "201", or "4xx" for the refused cases
    body: bytes = field(default=b"", repr=False)

    def encode(self) -> Request:
        prefix = uuid.uuid4().hex[:8]  # fresh ids each repetition: no 409
        for n, item in enumerate(self.items):
            item["id"] = f"worst-{prefix}-{n}"
        self.body = json.dumps(self.items).encode()
        return self


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _photo(width: int, height: int, *, mode: str = "RGB", levels: int = 256) -> Image.Image:
    """Smooth gradients with texture, like a photo; ``levels`` quantises it so a PNG of it fits a body limit."""
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    step = 256 // levels
    bands = [
        128 + 100 * np.sin(x / 97.0) * np.cos(y / 131.0),
        np.broadcast_to(255 * x / width, (height, width)),
        128 + 60 * np.sin((x + y) / 41.0),
        np.full((height, width), 200, dtype=np.float32),
    ][: len(mode)]
    pixels = np.stack([(np.clip(b, 0, 255).astype(np.uint8) // step) * step for b in bands], axis=-1)
    return Image.fromarray(pixels, mode)


def _encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


@functools.cache
def _png_within(width: int, height: int, max_bytes: int) -> bytes:
    """An RGBA PNG (4 bytes a pixel decoded, the costliest mode) of a photo-like picture, as detailed as fits."""
    for levels in (256, 32, 8, 2):
        data = _encode(_photo(width, height, mode="RGBA", levels=levels), "PNG")
        if len(data) <= max_bytes:
            return data
    raise SystemExit(f"cannot fit a {width}x{height} PNG in {max_bytes} bytes")


def _grey_png(width: int, height: int) -> bytes:
    """An all-black greyscale PNG written row by row with zlib (Pillow takes seconds for 1x20,000,000)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (width + 1)  # filter byte, then the pixels
    compressor = zlib.compressobj(9)
    step = max(1, (1 << 20) // len(row))
    idat = b"".join(compressor.compress(row * min(step, height - done)) for done in range(0, height, step)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class Workload:
    """The worst allowed requests under ``limits``, for a bundle with a text and an image encoder."""

    def __init__(self, settings: ServiceSettings, manifest: dict[str, Any]) -> None:
        self.s = settings
        version = int(manifest.get("format_version", 1))
        kinds = {bf.modality_encoder_kind(m, format_version=version): m for m in manifest.get("modalities", {}).values()}
        text, image = kinds.get(bf.TEXT), kinds.get(bf.IMAGE)
        if text is None or image is None:
            raise SystemExit("the bundle needs a text and an image encoder (ml100k-posters: MiniLM, EfficientNet-Lite0)")
        self.max_length = int(text.get("max_length", 256))
        self.tokenizer = Tokenizer.from_file(str(settings.bundle_dir / text["tokenizer"]))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.body_room = int((settings.max_body_bytes - 64 * 1024) * 3 / 4)  # base64 and JSON around the images

    def tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    def _words(self, tokens: int) -> str:
        """A text of at most ``tokens`` tokens (special tokens included), as many as common words make."""
        words = ["the", "quiet", "film", "about", "a", "lighthouse", "keeper", "and", "his", "dog"]
        count = tokens
        while count > 0 and self.tokens(" ".join(words[i % len(words)] for i in range(count))) > tokens:
            count -= 1
        return " ".join(words[i % len(words)] for i in range(count))

    def _long_text(self, chars: int) -> str:
        """``chars`` characters of prose: far more than max_length tokens, truncated by the service."""
        sentence = "A lighthouse keeper and his dog survive a storm on a quiet island, far from the city. "
        return (sentence * (chars // len(sentence) + 1))[:chars]

    def allowed(self) -> Iterator[Callable[[], Request]]:
        s = self.s
        per_text = min(s.max_text_chars, s.max_request_text_chars)

        def long_texts() -> Request:
            n = min(s.max_request_tokens // self.max_length, s.max_request_text_chars // per_text, s.max_batch_items)
            return Request("text: max tokens, long texts", f"{n} texts of {per_text} chars ({self.max_length} tokens each)",
                           [{"text": self._long_text(per_text)} for _ in range(n)])

        def many_texts() -> Request:
            n = s.max_batch_items
            tokens = s.max_request_tokens // n
            return Request("text: max items", f"{n} texts of {tokens} tokens", [{"text": self._words(tokens)} for _ in range(n)])

        def many_chars() -> Request:
            n = min(s.max_request_text_chars // per_text, s.max_batch_items)
            word = "x" * 1000  # longer than WordPiece's 100 characters: one [UNK] token per 1,000 characters
            text = " ".join([word] * (per_text // 1001))
            assert n * self.tokens(text) <= s.max_request_tokens
            return Request("text: max characters, few tokens", f"{n} texts of {len(text)} chars, {self.tokens(text)} tokens each",
                           [{"text": text} for _ in range(n)])

        side = min(s.max_image_side, math.isqrt(s.max_image_pixels))

        def square_png() -> Request:
            data = _png_within(side, side, self.body_room)
            return Request("image: max pixels, RGBA PNG", f"{side}x{side} ({len(data) / 1e6:.1f} MB)", [{"image_base64": _b64(data)}])

        def long_side() -> Request:
            width = s.max_image_side
            height = min(s.max_image_pixels // width, width)
            data = _png_within(width, height, self.body_room)
            return Request("image: max side, max pixels", f"{width}x{height} RGBA PNG", [{"image_base64": _b64(data)}])

        def strip(wide: bool) -> Callable[[], Request]:
            def build() -> Request:
                long = s.max_image_side
                short = math.ceil(long / s.max_image_aspect_ratio)
                width, height = (long, short) if wide else (short, long)
                data = _png_within(width, height, self.body_room)
                kind = "image: widest allowed strip" if wide else "image: tallest allowed strip"
                return Request(kind, f"{width}x{height} RGBA PNG (aspect {s.max_image_aspect_ratio:g}:1)", [{"image_base64": _b64(data)}])

            return build

        def big_jpeg() -> Request:
            width = min(s.max_image_side, math.isqrt(s.max_image_pixels * 3 // 2))
            height = s.max_image_pixels // width
            data = _encode(_photo(width, height), "JPEG", quality=92)
            return Request("image: max pixels, JPEG", f"{width}x{height} ({len(data) / 1e6:.1f} MB)", [{"image_base64": _b64(data)}])

        def max_total_pixels() -> Request:
            n = min(s.max_request_pixels // (side * side), s.max_request_images, s.max_batch_items)
            data = _png_within(side, side, self.body_room // max(n, 1))
            return Request("images: max total pixels", f"{n} x {side}x{side} RGBA PNG", [{"image_base64": _b64(data)} for _ in range(n)])

        poster = _encode(_photo(*POSTER), "JPEG", quality=90)  # a poster as TMDB serves them
        poster_pixels = POSTER[0] * POSTER[1]

        def many_images() -> Request:
            n = min(s.max_request_images, s.max_batch_items, s.max_request_pixels // poster_pixels)
            return Request("images: max count, posters", f"{n} x {POSTER[0]}x{POSTER[1]} JPEG", [{"image_base64": _b64(poster)} for _ in range(n)])

        def everything() -> Request:
            """Every request-wide limit reached at once: tokens, then images and pixels (one big image fewer than
            max_request_pixels allows, so that posters fill the image count)."""
            texts = long_texts().items
            max_images = min(s.max_request_images, s.max_batch_items)
            n_big = min(s.max_request_pixels // (side * side), max_images)
            if n_big > 0 and max_images > n_big:
                n_big -= 1
            n_small = min(max_images - n_big, (s.max_request_pixels - n_big * side * side) // poster_pixels)
            big = _png_within(side, side, (self.body_room - len(poster) * n_small) // max(n_big, 1)) if n_big else b""
            images = [big] * n_big + [poster] * n_small
            items = [dict(texts[i]) if i < len(texts) else {} for i in range(max(len(texts), len(images)))]
            for item, data in zip(items, images, strict=False):
                item["image_base64"] = _b64(data)
            return Request("everything at once", f"{len(texts)} long texts, {n_big} x {side}x{side} PNG, {n_small} posters", items)

        yield from (long_texts, many_texts, many_chars, square_png, long_side, strip(True), strip(False), big_jpeg,
                    max_total_pixels, many_images, everything)

    def refused(self) -> Iterator[Callable[[], Request]]:
        """The cases reproduced in issue 12: each must be refused with a 4xx before costing anything."""

        def long_texts() -> Request:
            words = ["lighthouse", "keeper", "survives", "storm", "quietly", "between", "islands"]  # 7.6 characters a word
            text = " ".join(words[i % len(words)] for i in range(3800))
            return Request("refused: 256 texts of 3,800 words", "issue 12", [{"text": text} for _ in range(256)], "4xx")

        def strip() -> Request:
            return Request("refused: 1x10000 PNG", "issue 12", [{"image_base64": _b64(_grey_png(1, 10_000))}], "4xx")

        def needle() -> Request:
            return Request("refused: 1x20000000 PNG", "issue 12", [{"image_base64": _b64(_grey_png(1, 20_000_000))}], "4xx")

        def big_pngs() -> Request:
            data = _b64(_grey_png(6000, 6000))
            return Request("refused: 8 x 6000x6000 PNG", "issue 12", [{"image_base64": data} for _ in range(8)], "4xx")

        def eps() -> Request:
            return Request("refused: EPS", "issue 12", [{"image_base64": _b64(_encode(Image.new("RGB", (64, 64)), "EPS"))}], "4xx")

        yield from (long_texts, strip, needle, big_pngs, eps)


# --- measuring -----------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    kind: str
    what: str
    items: int
    body_mb: float
    status: int
    detail: str
    time_s: float
    server_cpu_s: float
    peak_over_idle_mb: float
    peak_over_before_mb: float
    rss_after_minus_before_mb: float


def measure(server: Server, request: Request, *, idle_mb: float, settle_s: float) -> Measurement:
    before = server.rss_mb()
    server.reset_peak()
    cpu = server.cpu_s()
    start = time.perf_counter()
    response = httpx.post(f"{server.url}/v1/items", content=request.body, headers={"content-type": "application/json"}, timeout=600)
    elapsed = time.perf_counter() - start
    cpu = server.cpu_s() - cpu
    peak = server.peak_mb()
    time.sleep(settle_s)
    detail = "" if response.status_code == 201 else str(response.json().get("detail", ""))[:160]
    return Measurement(
        kind=request.kind, what=request.what, items=len(request.items), body_mb=round(len(request.body) / 1e6, 2),
        status=response.status_code, detail=detail, time_s=round(elapsed, 2), server_cpu_s=round(cpu, 2),
        peak_over_idle_mb=round(peak - idle_mb, 1), peak_over_before_mb=round(peak - before, 1),
        rss_after_minus_before_mb=round(server.rss_mb() - before, 1),
    )


def _worst(runs: list[Measurement]) -> Measurement:
    """Over repetitions: the highest peak and the longest time (each its own worst)."""
    worst = max(runs, key=lambda m: m.peak_over_idle_mb)
    slowest = max(runs, key=lambda m: m.time_s)
    return Measurement(**{**asdict(worst), "time_s": slowest.time_s, "server_cpu_s": slowest.server_cpu_s,
                          "status": max(r.status for r in runs)})


def table(rows: list[Measurement], *, allowed: bool) -> str:
    header = f"{'kind':<36} {'items':>5} {'body MB':>7} {'status':>6} {'time s':>7} {'cpu s':>6} {'peak MB':>8} {'after MB':>8}  goals"
    lines = [header, "-" * len(header)]
    for m in rows:
        goals = ""
        if allowed:
            goals = " ".join([
                "peak ok" if m.peak_over_idle_mb < PEAK_GOAL_MB else "PEAK",
                "time ok" if m.time_s < TIME_GOAL_S else "TIME",
            ])
        lines.append(f"{m.kind:<36} {m.items:>5} {m.body_mb:>7.2f} {m.status:>6} {m.time_s:>7.2f} {m.server_cpu_s:>6.2f} "
                     f"{m.peak_over_idle_mb:>8.1f} {m.rss_after_minus_before_mb:>8.1f}  {goals}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    home = Path(os.environ.get("MMREC_HOME", REPO / "var"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--bundle", type=Path, default=home / "bundles" / "ml100k-posters-lightgcn",
                        help="bundle with text and image encoders (default: $MMREC_HOME/bundles/ml100k-posters-lightgcn, "
                        "what `mmrec pipeline --dataset ml100k-posters` writes)")
    parser.add_argument("--out", type=Path, default=home / "bench" / "worst_requests.json", help="JSON results")
    parser.add_argument("--repeat", type=int, default=2, help="sends of each request (the worst is reported)")
    parser.add_argument("--settle-s", type=float, default=1.0, help="wait after each response before reading RSS")
    parser.add_argument("--port", type=int, default=18_731)
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    parser.add_argument("--only", default="", help="run only the kinds whose name contains this text")
    parser.add_argument("--nice", type=int, default=0,
                        help="run the server at this niceness; on a machine shared with other jobs, e.g. -10 (root) keeps "
                        "their load out of its wall times")
    args = parser.parse_args(argv)
    if not (args.bundle / bf.MANIFEST).is_file():
        raise SystemExit(f"{args.bundle}: no {bf.MANIFEST}; build one with `mmrec pipeline --dataset ml100k-posters` "
                         "or pass --bundle")

    settings = ServiceSettings(bundle_dir=args.bundle)  # MMREC_* of this environment, which the server inherits
    workload = Workload(settings, json.loads((args.bundle / bf.MANIFEST).read_text()))
    print("building request bodies ...", flush=True)
    allowed = [r.encode() for r in (build() for build in workload.allowed()) if args.only in r.kind]
    refused = [r.encode() for r in (build() for build in workload.refused()) if args.only in r.kind]

    load_before = os.getloadavg()
    with running_server(args.bundle, args.port, args.start_timeout_s, nice=args.nice) as server:
        time.sleep(args.settle_s)
        idle = server.rss_mb()
        print(f"server pid {server.process.pid}: idle RSS {idle:.0f} MB; load average {load_before[0]:.1f}", flush=True)
        results: list[Measurement] = []
        every_run: dict[str, list[dict[str, Any]]] = {}
        for request in allowed:
            runs = [measure(server, request.encode(), idle_mb=idle, settle_s=args.settle_s) for _ in range(args.repeat)]
            every_run[request.kind] = [asdict(run) for run in runs]
            results.append(_worst(runs))
            print(f"  {request.kind}: {results[-1].status} in {results[-1].time_s:.2f} s, peak +{results[-1].peak_over_idle_mb:.0f} MB", flush=True)
        after_burst = server.rss_mb()
        rejections = [measure(server, request.encode(), idle_mb=idle, settle_s=0.2) for request in refused]
        final = server.rss_mb()
    load_after = os.getloadavg()

    print()
    print(table(results, allowed=True))
    print()
    print(table(rejections, allowed=False))
    burst_growth = after_burst - idle
    print(f"\nidle RSS {idle:.0f} MB; after the burst of allowed requests {after_burst:.0f} MB ({burst_growth:+.0f} MB, goal "
          f"< {AFTER_GOAL_MB:.0f}: {'ok' if burst_growth < AFTER_GOAL_MB else 'MISSED'}); after the refused ones {final:.0f} MB")
    print(f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} CPUs; server niceness "
          f"{args.nice} (other processes share the CPUs: wall times are upper bounds, cpu s is the server's own work)")

    wrong = [m for m in results if m.status != 201] + [m for m in rejections if not 400 <= m.status < 500]
    report = {
        "bundle": str(args.bundle), "repeat": args.repeat, "server_nice": args.nice, "cpus": os.cpu_count(), "python": platform.python_version(),
        "load_average_before": load_before, "load_average_after": load_after,
        "limits": {name: getattr(settings, name) for name in ServiceSettings.model_fields if name.startswith(("max_", "encode_"))},
        "goals": {"peak_over_idle_mb": PEAK_GOAL_MB, "time_s": TIME_GOAL_S, "rss_after_burst_mb": AFTER_GOAL_MB},
        "idle_rss_mb": round(idle, 1), "rss_after_burst_mb": round(after_burst, 1), "rss_final_mb": round(final, 1),
        "allowed": [asdict(m) for m in results], "allowed_runs": every_run, "refused": [asdict(m) for m in rejections],
        "wrong_status": [m.kind for m in wrong],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    if wrong:
        print("unexpected status: " + "; ".join(f"{m.kind}: {m.status} {m.detail}" for m in wrong), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
