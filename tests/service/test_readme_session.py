"""The README's curl session, run as written (bash, real curl, a real ``mmrec-serve``) against a served bundle: the
text-only bundle a bare clone gets, and a text + image bundle as with the shared data."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from bundle_factory import make_bundle
from service_test_support import start_mmrec_serve, stop_mmrec_serve

REPO = Path(__file__).resolve().parents[2]
DEMO_URL = "http://127.0.0.1:8000"
POSTER = REPO.parent / "shared" / "data" / "ml100k-posters" / "posters" / "1.jpg"

# Every curl records its status and body: `curl` is a shell function around the real one.
RECORDING_CURL = r"""
curl() {
  local out
  out=$(command curl -sS -w '\n%{http_code}' "$@") || return 1
  printf '%s\n' "${out##*$'\n'}" >> "$STATUS_FILE"
  printf '%s\n' "${out%$'\n'*}" >> "$BODY_FILE"
}
"""


def readme_block(marker: str) -> str:
    """The ```bash block that follows ``<!-- readme-session{marker} -->`` in the README."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- readme-session{re.escape(marker)} -->\s*```bash\n(.*?)```", text, re.S)
    assert match, f"README.md has no <!-- readme-session{marker} --> block"
    return match.group(1)


def run_block(block: str, url: str, tmp_path: Path) -> list[tuple[int, str]]:
    status_file, body_file = tmp_path / "status", tmp_path / "bodies"
    status_file.write_text("")
    body_file.write_text("")
    script = "set -e\n" + RECORDING_CURL + block.replace(DEMO_URL, url)
    subprocess.run(["bash", "-c", script], cwd=REPO, check=True, timeout=60,
                   env={"PATH": "/usr/bin:/bin", "STATUS_FILE": str(status_file), "BODY_FILE": str(body_file)})  # fmt: skip
    statuses = [int(line) for line in status_file.read_text().split()]
    bodies = body_file.read_text().splitlines()
    assert len(statuses) == len(bodies) == block.count("curl ")
    return list(zip(statuses, bodies, strict=True))


@pytest.fixture(params=["bare", "shared"])
def demo_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    with_images = request.param == "shared"
    if with_images and not POSTER.is_file():
        pytest.skip(f"no shared data at {POSTER.parent}")
    root = tmp_path_factory.mktemp(f"readme-{request.param}")
    users = [str(u) for u in range(180, 220)]  # the README's user 196 is a trained user, as in ml100k
    bundle = make_bundle(root / "bundle", feature_modalities={}, text=True, image=with_images, user_ids=users)
    url, process = start_mmrec_serve(bundle.path, ["--device", "cpu", "--state-dir", str(root / "state")], cwd=root)
    try:
        yield url, with_images
    finally:
        stop_mmrec_serve(process)


def test_readme_session_runs_as_written(demo_server: tuple[str, bool], tmp_path: Path) -> None:
    url, _ = demo_server
    results = run_block(readme_block(""), url, tmp_path)
    assert [status for status, _ in results] == [200, 201, 200, 201, 200], results
    assert '"id":"new-film"' in results[1][1]
    assert '"items":[' in results[2][1] and '"items":[' in results[4][1]


def test_readme_image_example_runs_with_the_shared_data_and_says_why_not_without(
    demo_server: tuple[str, bool], tmp_path: Path
) -> None:
    url, with_images = demo_server
    if not POSTER.is_file():
        pytest.skip(f"no shared data at {POSTER.parent}: the README's poster path does not exist")
    [(status, body)] = run_block(readme_block(": image"), url, tmp_path)
    if with_images:
        assert status == 201 and '"id":"new-poster"' in body, body
    else:
        assert status == 422 and "this bundle has no image encoder" in body, body
