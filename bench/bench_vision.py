#!/usr/bin/env python3
"""Benchmark: the vision node's camera ingest at 30 Hz, idle and while answering questions.

A camera process publishes 640x480 rgb8 frames at 30 Hz (best effort, like most drivers) to the
installed ``vision_node`` running in its own process. Two phases of ``--duration`` seconds each:

* **idle** - no questions: the node only ingests. Reported: frames published, CPU seconds the node
  process used (user + system, from /proc via psutil: rclpy's deserialization of 921,600-byte
  messages, the executor, our callback), as % of one core and per frame.
* **questions** - a question every ``--interval`` seconds through the ``ask`` action (one at a time):
  the same CPU figures, plus each answer's ``frame_age_ms`` (age of the answered frame when inference
  started; goal: at most one frame period plus decode time) and the client-side latency.

At the end the node logs how many frames it received and decoded (decoding happens only for
questions). The model is a tiny random-weight LLaVA built offline (no VLM weights can be installed
here); ingest cost does not depend on the model. Goals (issue): ingest < 10 % of one core at 30 Hz
while idle; frame age <= one frame period + decode time.

    .venv/bin/python bench/bench_vision.py [--duration 60] [--quick] [--out FILE]

JSON on stdout and in ``--out`` (default ``bench/results/bench_vision.json``).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from reporting import write_report

HERE = Path(__file__).resolve().parent
TEST_DIR = HERE.parent / "test"
NAMESPACE = "/slm_bench_vision"


def log(msg: str) -> None:
    print(f"[bench_vision] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between questions")
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--reliable", action="store_true",
                        help="reliable camera publisher and camera_qos:=reliable on the node")
    parser.add_argument("--quick", action="store_true", help="10 s phases (smoke run)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_vision.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 10.0
    return args


def cpu_seconds(proc) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def percentile(values: List[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    sys.path.insert(0, str(TEST_DIR))
    import psutil
    import rclpy
    from domain_coordinator import domain_id as reserve
    from rclpy.action import ActionClient

    from slm_ros.action import AskImage
    from slm_ros.cli import node_executable
    from slm_ros.ros import qos
    from vlm_fixtures import build_tiny_llava

    work = Path(tempfile.mkdtemp(prefix="bench_vision_"))
    model = build_tiny_llava(work / "tiny-llava")
    with reserve() as did:
        env = dict(os.environ, ROS_DOMAIN_ID=str(did), PYTHONUNBUFFERED="1")
        node_log = work / "vision_node.log"
        node = subprocess.Popen(
            [node_executable("vision_node"), "--ros-args", "-r", f"__ns:={NAMESPACE}",
             "-p", f"model:={model}", "-p", "dtype:=float32", "-p", "default_max_new_tokens:=8",
             "-p", "max_frame_age_ms:=0.0", "-p", "image_max_side:=512",
             "-p", f"camera_qos:={'reliable' if args.reliable else 'best_effort'}"],
            stdout=open(node_log, "w"), stderr=subprocess.STDOUT, env=env)
        stamps = work / "stamps.txt"
        camera = None
        rclpy.init(domain_id=did)
        client_node = rclpy.create_node("bench_vision_client", namespace=NAMESPACE)
        try:
            deadline = time.monotonic() + 180
            while "active: serving" not in node_log.read_text():
                if node.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"vision node did not start:\n{node_log.read_text()}")
                time.sleep(0.2)
            camera = subprocess.Popen(
                [sys.executable, str(TEST_DIR / "camera_publisher.py"), "--namespace", NAMESPACE,
                 "--rate", str(args.rate), "--width", str(args.width), "--height",
                 str(args.height), "--stamps", str(stamps)] + (["--reliable"] if args.reliable
                                                               else []), env=env)
            ask = ActionClient(client_node, AskImage, "ask",
                               feedback_sub_qos_profile=qos.ACTION_FEEDBACK)
            assert ask.wait_for_server(timeout_sec=30), "ask action not found"
            time.sleep(3.0)   # camera and discovery settle
            proc = psutil.Process(node.pid)

            def published() -> int:
                return len(stamps.read_text().splitlines()) if stamps.exists() else 0

            # Phase 1: idle ingest.
            log(f"idle phase: {args.duration:.0f} s at {args.rate:g} Hz, "
                f"{args.width}x{args.height} rgb8")
            c0, p0, t0 = cpu_seconds(proc), published(), time.monotonic()
            time.sleep(args.duration)
            c1, p1, t1 = cpu_seconds(proc), published(), time.monotonic()
            idle = {"seconds": t1 - t0, "frames_published": p1 - p0,
                    "node_cpu_s": c1 - c0,
                    "node_cpu_percent_of_one_core": 100.0 * (c1 - c0) / (t1 - t0),
                    "node_cpu_ms_per_frame": 1e3 * (c1 - c0) / max(1, p1 - p0)}
            log(f"idle: {idle}")

            # Phase 2: questions.
            log(f"question phase: one question every {args.interval:g} s")
            ages, latencies, errors = [], [], []
            c0, p0, t0 = cpu_seconds(proc), published(), time.monotonic()
            n = 0
            while time.monotonic() - t0 < args.duration:
                n += 1
                sent = time.monotonic()
                future = ask.send_goal_async(AskImage.Goal(question=f"What do you see? ({n})"))
                rclpy.spin_until_future_complete(client_node, future, timeout_sec=30)
                result = future.result().get_result_async()
                rclpy.spin_until_future_complete(client_node, result, timeout_sec=60)
                answer = result.result().result.answer
                if answer.finish_reason == "error":
                    errors.append(answer.error)
                else:
                    ages.append(answer.frame_age_ms)
                    latencies.append((time.monotonic() - sent) * 1e3)
                time.sleep(max(0.0, sent + args.interval - time.monotonic()))
            c1, p1, t1 = cpu_seconds(proc), published(), time.monotonic()
            period_ms = 1e3 / args.rate
            asking = {"seconds": t1 - t0, "frames_published": p1 - p0, "questions": n,
                      "errors": errors, "node_cpu_s": c1 - c0,
                      "node_cpu_percent_of_one_core": 100.0 * (c1 - c0) / (t1 - t0),
                      "frame_age_ms": {"median": statistics.median(ages) if ages else 0.0,
                                       "p90": percentile(ages, 0.9), "max": max(ages, default=0),
                                       "min": min(ages, default=0), "all": ages},
                      "answer_latency_ms_median": statistics.median(latencies) if latencies
                      else 0.0,
                      "frame_period_ms": period_ms}
            log(f"questions: frame age median {asking['frame_age_ms']['median']:.1f} ms, p90 "
                f"{asking['frame_age_ms']['p90']:.1f} ms (period {period_ms:.1f} ms)")
        finally:
            client_node.destroy_node()
            rclpy.try_shutdown()
            if camera is not None:
                camera.send_signal(signal.SIGINT)
                camera.wait(timeout=10)
            node.send_signal(signal.SIGINT)
            node.wait(timeout=20)
    text = node_log.read_text()
    counts = re.search(r"camera: (\d+) frames received, (\d+) decoded", text)
    report = {
        "benchmark": "vision_ingest",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "camera": {"width": args.width, "height": args.height, "encoding": "rgb8",
                   "rate_hz": args.rate,
                   "reliability": "reliable" if args.reliable else "best_effort",
                   "frames_published_total": len(stamps.read_text().splitlines())},
        "node_totals": {"frames_received": int(counts.group(1)) if counts else None,
                        "frames_decoded": int(counts.group(2)) if counts else None},
        "idle": idle,
        "questions": asking,
        "goals": {"idle_cpu_percent_below": 10.0,
                  "idle_cpu_ok": idle["node_cpu_percent_of_one_core"] < 10.0,
                  "frame_age_median_within_one_period_plus_decode":
                  asking["frame_age_ms"]["median"] <= period_ms + 5.0},
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
