"""Screenshots of the built site as a reader sees it, with headless Chromium (Debian's
``chromium`` package), at a desktop and a phone width.

    python docs/build.py && python docs/screenshots.py     # PNGs in docs/_build/screenshots
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

DOCS = Path(__file__).resolve().parent
PAGES = {"front": "index.html", "guide": "guides/losses.html", "api": "api.html"}
WIDTHS = {"desktop": (1280, 900), "phone": (390, 844)}


def screenshot(page: Path, output: Path, width: int, height: int) -> Path:
    """One PNG of ``page`` in a ``width`` x ``height`` window."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise FileNotFoundError("no chromium: apt-get install chromium")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    command += [
        f"--window-size={width},{height}",
        f"--screenshot={output}",
        page.resolve().as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--site", default=str(DOCS / "_build" / "html"))
    parser.add_argument("--output", default=str(DOCS / "_build" / "screenshots"))
    args = parser.parse_args()
    site, output = Path(args.site), Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for name, page in PAGES.items():
        for device, (width, height) in WIDTHS.items():
            print(screenshot(site / page, output / f"{name}_{device}.png", width, height))


if __name__ == "__main__":
    main()
