"""Does the demo start, answer, show per-stage latencies and stop cleanly under each placement?

For each placement of `--placement` (split, two-tier, fused, or a JSON list of groups), one after the
other: `recserve-serve demo --placement NAME` as a child process on a free port; when `/readyz` answers
200, a recommendation with `?debug=1` (its per-stage timings) and the demo page in headless chromium
(Debian's chromium + chromedriver, as `tests/integration/test_demo_browser.py`): the page's latency
bars, one per stage the answer went through; then Ctrl-C (SIGINT, what a person at the terminal
sends), the exit code, how long the stop took, and the processes the demo had started that are still
alive 10 s after it.

    python bench/demo_placements.py --data-dir /tmp/demo --placement fused,split
    # after `recserve train --data-dir /tmp/demo --promote`

Prints a table and writes bench/results/demo_placements.json. It starts Ray once per placement
(~1 min each on 2 cores), so it runs outside CI; the tests cover each placement's serving paths.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.chaos import leftover  # noqa: E402
from bench.graph_vs_inprocess import parse_placements  # noqa: E402
from bench.serving_load import free_port, ready, write_results  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
STAGES = ("user_tower", "retriever", "ranker", "reranker")


def get_json(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds until `url` is ready; fails at once if the demo exits first."""
    started = time.monotonic()
    while not ready(url):
        if process.poll() is not None:
            raise RuntimeError(f"the demo exited with {process.returncode} before it was ready")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{url} not ready after {timeout:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - started


def page_latency_bars(url: str, timeout: float = 60.0) -> dict[str, str]:
    """The demo page's latency bars (stage -> its label), once the page has shown a list."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(timeout)
        driver.get(f"{url}/demo")
        WebDriverWait(driver, timeout).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#latency .bar-row[data-stage]")
        )
        rows = driver.find_elements(By.CSS_SELECTOR, "#latency .bar-row[data-stage]")
        return {str(r.get_attribute("data-stage")): r.text.replace("\n", " ") for r in rows}
    finally:
        driver.quit()


def run_one(args: argparse.Namespace, placement: Any) -> dict[str, Any]:
    import psutil

    label = placement if isinstance(placement, str) else json.dumps(placement)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).parent / "recserve-serve"),
        "demo",
        "--data-dir",
        str(args.data_dir),
        "--port",
        str(port),
        "--placement",
        label,
    ]
    log = (args.log_dir / f"demo-{label.replace('/', '_')}.log").open("wb")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    out: dict[str, Any] = {"placement": placement}
    try:
        out["ready_s"] = round(wait_ready(url, process, args.ready_timeout), 1)
        users = get_json(f"{url}/v1/demo/users")
        user = str((users.get("users") or [{}])[0].get("user_id", "u1"))
        answer = get_json(f"{url}/v1/recommendations?debug=1", {"user_id": user, "k": 10})
        debug = answer.get("debug") or {}
        out["items"] = len(answer.get("items", []))
        out["fallback"] = answer.get("fallback")
        out["timings_ms"] = debug.get("timings_ms", {})
        out["page_bars"] = page_latency_bars(url)
    finally:
        pids = [c.pid for c in psutil.Process(process.pid).children(recursive=True)]
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        try:
            out["exit_code"] = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            out["exit_code"] = "killed after 120 s"
        out["stop_s"] = round(time.monotonic() - started, 1)
        time.sleep(max(0.0, 10.0 - (time.monotonic() - started)))
        out["processes"] = len(pids)
        out["left"] = len(leftover(pids))
        log.close()
    stages = [s for s in STAGES if s in out.get("timings_ms", {})]
    out["ok"] = bool(
        out.get("items")
        and not out.get("fallback")
        and stages == list(STAGES)
        and all(s in out.get("page_bars", {}) for s in STAGES)
        and out.get("exit_code") == 0
        and out.get("left") == 0
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="trained data dir (registry)")
    parser.add_argument("--placement", type=parse_placements, default=["fused", "split"])
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--log-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")))
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "demo_placements.json"
    )
    args = parser.parse_args(argv)
    rows = [run_one(args, placement) for placement in args.placement]
    print(
        f"{'placement':<12} {'ready s':>8} {'items':>6} {'stages timed':<40} {'exit':>5} {'stop s':>7} {'left':>5}  ok"
    )
    for r in rows:
        label = r["placement"] if isinstance(r["placement"], str) else json.dumps(r["placement"])
        timed = ",".join(r.get("timings_ms", {}))
        print(
            f"{label:<12} {r.get('ready_s', '-'):>8} {r.get('items', '-'):>6} {timed:<40} "
            f"{r.get('exit_code')!s:>5} {r.get('stop_s')!s:>7} {r.get('left')!s:>5}  {r['ok']}"
        )
        print(f"  page bars: {r.get('page_bars')}")
    write_results(args.json, "demo_placements.py", argv or sys.argv[1:], {"runs": rows})
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
