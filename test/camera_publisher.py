"""A camera stand-in for tests and benchmarks: publishes sensor_msgs/Image frames at a fixed rate
from its own process (real rclpy, real DDS), and writes the stamp of every published frame to a file.

    python camera_publisher.py --namespace /t --rate 30 --width 160 --height 120 --stamps FILE
"""

from __future__ import annotations

import argparse
import array
import sys
import time

import numpy as np
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image


def frame(width: int, height: int, n: int) -> np.ndarray:
    """A cheap moving test pattern (RGB), different each frame."""
    x = (np.arange(width, dtype=np.uint16)[None, :] + 4 * n) % 256
    y = np.arange(height, dtype=np.uint16)[:, None] % 256
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = x
    img[..., 1] = y
    img[..., 2] = (x + y) % 256
    return img


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--namespace", default="/t")
    parser.add_argument("--topic", default="image")
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--reliable", action="store_true",
                        help="reliable publisher (default: best effort, like most drivers)")
    parser.add_argument("--stamps", default="", help="file to append 'sec nanosec' per frame")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; 0 = until killed")
    parser.add_argument("--wait-subscribers", type=int, default=0,
                        help="publish only once this many subscriptions have matched (max 60 s)")
    args = parser.parse_args(argv)

    rclpy.init()
    node = rclpy.create_node("camera", namespace=args.namespace)
    reliability = ReliabilityPolicy.RELIABLE if args.reliable else ReliabilityPolicy.BEST_EFFORT
    pub = node.create_publisher(Image, args.topic, QoSProfile(depth=1, reliability=reliability))
    stamps = open(args.stamps, "a", buffering=1) if args.stamps else None
    # Pre-render a few frames: the publisher must keep its rate on a loaded machine.
    # array('B') is rclpy's fast path for uint8[] (bytes would be checked element by element).
    frames = [array.array("B", frame(args.width, args.height, n).tobytes()) for n in range(8)]
    deadline = time.monotonic() + 60.0
    while (rclpy.ok() and pub.get_subscription_count() < args.wait_subscribers
           and time.monotonic() < deadline):
        time.sleep(0.02)
    period = 1.0 / args.rate
    start = time.monotonic()
    n = 0
    try:
        while rclpy.ok():
            msg = Image(height=args.height, width=args.width, encoding="rgb8",
                        step=args.width * 3, data=frames[n % len(frames)])
            msg.header.stamp = node.get_clock().now().to_msg()
            msg.header.frame_id = "camera"
            pub.publish(msg)
            if stamps:
                stamps.write(f"{msg.header.stamp.sec} {msg.header.stamp.nanosec}\n")
            n += 1
            if args.duration and time.monotonic() - start >= args.duration:
                break
            time.sleep(max(0.0, start + n * period - time.monotonic()))
    except KeyboardInterrupt:
        pass
    finally:
        print(f"camera: published {n} frames", file=sys.stderr)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
