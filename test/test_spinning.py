"""spin_until_shutdown: a shutdown ends spinning normally; a real rcl error still surfaces."""

import threading

import pytest
import rclpy
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor

from slm_ros.ros.spinning import RCLError, spin_until_shutdown


@pytest.fixture
def context(domain_id):
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain_id)
    yield ctx
    rclpy.try_shutdown(context=ctx)


@pytest.mark.parametrize("executor_class", [SingleThreadedExecutor, MultiThreadedExecutor])
@pytest.mark.parametrize("delay", [0.0, 0.001, 0.05])   # before, while and after the first wait
def test_a_shutdown_from_another_thread_ends_spinning_normally(domain_id, executor_class, delay):
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    node = rclpy.create_node("spin_probe", context=context)
    executor = executor_class(context=context)
    executor.add_node(node)
    timer = threading.Timer(delay, rclpy.shutdown, kwargs={"context": context})
    timer.start()
    spin_until_shutdown(executor)   # returns, does not raise
    timer.join()
    assert not context.ok()
    executor.shutdown()
    node.destroy_node()


def test_an_rcl_error_while_the_context_is_valid_is_raised(context):
    node = rclpy.create_node("spin_error_probe", context=context)

    def fail():
        raise RCLError("a real rcl failure")

    node.create_timer(0.01, fail)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    with pytest.raises(RCLError, match="a real rcl failure"):
        spin_until_shutdown(executor)
    executor.shutdown()
    node.destroy_node()
