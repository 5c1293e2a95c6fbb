"""QoS profiles, named by what the topic carries. Every publisher/subscription uses one of these."""

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

#: Requests and commands into a node (prompt, request, cancel): reliable, so none is dropped; deep
#: enough for a burst from `ros2 topic pub` loops or many clients.
COMMANDS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                      reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)

#: Streamed token chunks: reliable and deep, so a burst of chunks from fast decoding (hundreds of
#: tokens per second on a GPU) is never dropped for a subscriber that is momentarily slow.
TOKEN_STREAM = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000,
                          reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)

#: Whole results (one message per finished request): reliable.
RESULTS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                     reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)

#: Action feedback carrying token chunks (the `generate` action): the same as TOKEN_STREAM. The rclpy
#: default for feedback is depth 10, which drops chunks when a burst outruns the client; both the
#: server and our clients use this profile. Clients of other packages should do the same.
ACTION_FEEDBACK = TOKEN_STREAM

#: Engine builder status: reliable and transient local with depth 1, so a node that subscribes after
#: the build finished still gets the last state.
ENGINE_STATUS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                           reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.TRANSIENT_LOCAL)

#: Camera frames: best effort, newest only. A best-effort subscription matches both reliable and
#: best-effort publishers (drivers use either), and depth 1 keeps only the newest frame.
CAMERA = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                    reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE)
