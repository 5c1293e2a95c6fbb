"""Helpers for tests that talk to real llm_node / vision_node processes over real DDS (no mocks)."""

from __future__ import annotations

import array
import collections
import contextlib
import os
import signal
import subprocess
import threading
import time
from typing import Dict, List, Optional

import numpy as np
import rclpy
from rclpy.executors import MultiThreadedExecutor
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from slm_ros.action import AskImage, Generate
from slm_ros.cli import node_executable
from slm_ros.msg import GenerateRequest, TokenChunk, VisionAnswer
from slm_ros.ros import qos
from slm_ros.ros.action_client import ThreadSafeActionClient


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the test process dies, so a killed or timed-out
    test run never leaves a node behind serving a later run on the same ROS domain."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class NodeProcess:
    """An installed node (default llm_node) started as a subprocess in its own ROS domain, output
    kept in a log."""

    def __init__(self, domain_id: int, log_path, namespace: str = "/t",
                 executable: str = "llm_node", remaps=(), env: Optional[dict] = None,
                 **params) -> None:
        self.namespace = namespace
        self.domain_id = domain_id
        self.executable = executable
        self.log_path = log_path
        cmd = [node_executable(executable), "--ros-args", "-r", f"__ns:={namespace}"]
        for remap in remaps:
            cmd += ["-r", remap]
        for key, value in params.items():
            cmd += ["-p", f"{key}:={value}"]
        env = dict(os.environ, **(env or {}), ROS_DOMAIN_ID=str(domain_id),
                   ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1")
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(log_path.parent), preexec_fn=_die_with_parent)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    def stop(self) -> Optional[int]:
        """SIGINT, wait, SIGINT again, then SIGKILL; returns the exit code."""
        for sig, wait in ((signal.SIGINT, 10), (signal.SIGINT, 5), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def served_by(node: NodeProcess, client_cls):
    """A ``client_cls`` participant (LlmClient, VisionClient) in ``node``'s domain and namespace,
    ready; on exit the client closes and the node must stop with exit code 0."""
    client = client_cls(node.domain_id, node.namespace)
    client.wait_ready()
    try:
        yield client
    finally:
        client.close()
        code = node.stop()
        assert code == 0, f"{node.executable} exit code {code}\n{node.log()}"


class RosParticipant:
    """A ROS node in the test process with its own context (so it never shares a domain with
    another test), spun by a MultiThreadedExecutor on a thread; subclasses create their entities
    and then call :meth:`start`. ``_cv`` guards what callbacks collect; :meth:`wait_for` waits on
    it."""

    def __init__(self, domain_id: int, name: str, namespace: str = "/t") -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(name, namespace=namespace, context=self.context)
        self._cv = threading.Condition()

    def start(self, threads: int = 4) -> None:
        self.executor = MultiThreadedExecutor(num_threads=threads, context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def wait_for(self, predicate, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(timeout=left)
            return True

    def close(self) -> None:
        self.executor.shutdown()
        self._thread.join(timeout=5)
        # Node.destroy_node leaves waitables (action clients) alive, with their endpoints in the
        # graph, until garbage collection: a later test in the same domain would still see them.
        for waitable in list(self.node.waitables):
            waitable.destroy()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


class LlmClient(RosParticipant):
    """A client node in the test process: topics, the generate action, and every chunk seen."""

    def __init__(self, domain_id: int, namespace: str = "/t") -> None:
        super().__init__(domain_id, "test_client", namespace)
        self.chunks: Dict[str, List[TokenChunk]] = collections.defaultdict(list)
        self.responses: List[str] = []
        self.node.create_subscription(TokenChunk, "tokens", self._on_chunk, qos.TOKEN_STREAM)
        self.node.create_subscription(String, "response", self._on_response, qos.RESULTS)
        self.prompt_pub = self.node.create_publisher(String, "prompt", qos.COMMANDS)
        self.request_pub = self.node.create_publisher(GenerateRequest, "request", qos.COMMANDS)
        self.cancel_pub = self.node.create_publisher(String, "cancel", qos.COMMANDS)
        # Deep service profiles as the README advises clients with many goals in flight: with
        # rclpy's depth 10, a burst of goal or result responses can drop some.
        self.action = ThreadSafeActionClient(self.node, Generate, "generate",
                                             goal_service_qos_profile=qos.ACTION_SERVICES,
                                             result_service_qos_profile=qos.ACTION_SERVICES,
                                             cancel_service_qos_profile=qos.ACTION_SERVICES,
                                             feedback_sub_qos_profile=qos.ACTION_FEEDBACK)
        self.start()

    def _on_chunk(self, msg: TokenChunk) -> None:
        with self._cv:
            self.chunks[msg.request_id].append(msg)
            self._cv.notify_all()

    def _on_response(self, msg: String) -> None:
        with self._cv:
            self.responses.append(msg.data)
            self._cv.notify_all()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the node's action server and topic endpoints are matched."""
        assert self.action.wait_for_server(timeout_sec=timeout), "llm node action server not found"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.prompt_pub.get_subscription_count() and self.request_pub.get_subscription_count()
                    and self.cancel_pub.get_subscription_count()
                    and self.node.count_publishers(self.node.resolve_topic_name("tokens"))):
                time.sleep(0.3)  # let the node's subscriptions to our publishers settle
                return
            time.sleep(0.05)
        raise AssertionError("llm node topics not matched")

    def finals(self) -> Dict[str, List[TokenChunk]]:
        with self._cv:
            return {rid: [c for c in cs if c.is_final] for rid, cs in self.chunks.items()}

    def wait_final(self, request_id: str, timeout: float = 60.0) -> TokenChunk:
        ok = self.wait_for(lambda: any(c.is_final for c in self.chunks.get(request_id, ())), timeout)
        assert ok, f"no final chunk for {request_id} within {timeout} s"
        return [c for c in self.chunks[request_id] if c.is_final][0]

    def request(self, prompt: str, request_id: str, **fields) -> None:
        msg = GenerateRequest(prompt=prompt, request_id=request_id)
        for key, value in fields.items():
            if key == "sampling":
                for skey, svalue in value.items():
                    setattr(msg.sampling, skey, svalue)
            else:
                setattr(msg, key, value)
        self.request_pub.publish(msg)

    def send_goal(self, prompt: str, feedback: Optional[list] = None, **sampling):
        """Send a goal; returns the goal handle (accepted)."""
        goal = Generate.Goal()
        goal.request.prompt = prompt
        for key, value in sampling.items():
            setattr(goal.request.sampling, key, value)
        def on_feedback(fb) -> None:
            with self._cv:
                feedback.append(fb.feedback.chunk)
                self._cv.notify_all()
        cb = on_feedback if feedback is not None else None
        future = self.action.send_goal_async(goal, feedback_callback=cb)
        handle = wait_future(future)
        assert handle.accepted
        return handle


class VisionClient(RosParticipant):
    """Test-side ROS participant: image publishers, question publisher, answer subscribers, the
    ask action."""

    def __init__(self, domain_id: int, namespace: str = "/t") -> None:
        super().__init__(domain_id, "vision_test_client", namespace)
        self.answers = []
        self.chunks = {}
        # Reliable publishers: the node's best-effort subscriptions must match them too.
        self.image_pub = self.node.create_publisher(Image, "image", 1)
        self.compressed_pub = self.node.create_publisher(CompressedImage, "image/compressed", 1)
        self.question_pub = self.node.create_publisher(String, "question", qos.COMMANDS)
        self.node.create_subscription(VisionAnswer, "answer", self._on_answer, qos.RESULTS)
        self.node.create_subscription(TokenChunk, "answer_tokens", self._on_chunk,
                                      qos.TOKEN_STREAM)
        self.action = ThreadSafeActionClient(self.node, AskImage, "ask",
                                             feedback_sub_qos_profile=qos.ACTION_FEEDBACK)
        self.start()

    def _on_answer(self, msg) -> None:
        with self._cv:
            self.answers.append(msg)
            self._cv.notify_all()

    def _on_chunk(self, msg) -> None:
        with self._cv:
            self.chunks.setdefault(msg.request_id, []).append(msg)
            self._cv.notify_all()

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        return super().wait_for(predicate, timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.action.wait_for_server(timeout_sec=timeout), "vision node ask action not found"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.image_pub.get_subscription_count() and
                    self.compressed_pub.get_subscription_count() and
                    self.question_pub.get_subscription_count()):
                return
            time.sleep(0.05)
        raise AssertionError("vision node subscriptions not matched")

    def ask_topic(self, question: str, timeout: float = 30.0) -> VisionAnswer:
        """Publish a question, return the next answer to it."""
        with self._cv:
            before = len(self.answers)
        self.question_pub.publish(String(data=question))
        assert self.wait_for(lambda: any(a.question == question
                                         for a in self.answers[before:]), timeout)
        return [a for a in self.answers[before:] if a.question == question][0]

    def publish_raw(self, encoding, width, height, step, data, frame_id="test") -> Image:
        msg = Image(encoding=encoding, width=width, height=height, step=step,
                    data=array.array("B", bytes(data)))
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.header.frame_id = frame_id
        self.image_pub.publish(msg)
        return msg

    def publish_rgb(self, rgb: np.ndarray, frame_id="test") -> Image:
        h, w = rgb.shape[:2]
        return self.publish_raw("rgb8", w, h, w * 3, rgb.tobytes(), frame_id)

    def send_goal(self, question: str, feedback=None, image: Image = None, **sampling):
        goal = AskImage.Goal(question=question)
        if image is not None:
            goal.image = image
        for key, value in sampling.items():
            setattr(goal.sampling, key, value)

        def on_feedback(fb) -> None:
            with self._cv:
                feedback.append(fb.feedback.chunk)
                self._cv.notify_all()

        handle = wait_future(self.action.send_goal_async(
            goal, feedback_callback=on_feedback if feedback is not None else None))
        assert handle.accepted
        return handle


def wait_future(future, timeout: float = 60.0):
    """Wait for an rclpy future that another thread's executor completes."""
    done = threading.Event()
    future.add_done_callback(lambda _f: done.set())
    assert done.wait(timeout), "future did not complete"
    return future.result()


def assert_stream_ok(chunks: List[TokenChunk]) -> str:
    """seq 0..n-1 without gaps, exactly one final chunk and it is the last; returns the text."""
    seqs = [c.seq for c in chunks]
    assert seqs == list(range(len(chunks))), f"seq not gapless: {seqs}"
    finals = [c for c in chunks if c.is_final]
    assert len(finals) == 1 and chunks[-1].is_final, "exactly one final chunk, last"
    assert finals[0].finish_reason in ("stop", "length", "cancelled", "error")
    return "".join(c.text for c in chunks)


def assert_feedback_ok(feedback: List[TokenChunk], result_text: str) -> None:
    """Action feedback as a client sees it: seq 0.. without gaps and a prefix of the result text.

    rclpy's ActionClient drops feedback that arrives after the goal's result (it removes the goal's
    feedback callback then), and feedback (a topic) may be overtaken by the result (a service
    reply): the last chunks, the final one included, can be missing. The result carries the whole
    answer; the ``tokens`` topic carries every chunk.
    """
    seqs = [c.seq for c in feedback]
    assert seqs == list(range(len(feedback))), f"seq not gapless: {seqs}"
    finals = [c for c in feedback if c.is_final]
    assert len(finals) <= 1 and (not finals or feedback[-1].is_final)
    text = "".join(c.text for c in feedback)
    assert result_text.startswith(text), (text, result_text)
    if finals:
        assert text == result_text
