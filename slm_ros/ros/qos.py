"""QoS profiles, named by what the topic carries. Every publisher/subscription uses one of these."""

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

#: Requests and commands into a node (prompt, request, cancel): reliable and keep-all, so none is
#: dropped. With keep-last a burst faster than the node takes it overwrites unread requests: 884 of
#: 1000 prompts published in a loop were lost at depth 100 (test/test_reliability.py), none with
#: keep-all. Keep-all makes a writer wait (Fast DDS: up to 100 ms) when the reader's resource limits
#: are full, instead of dropping. (``depth`` is ignored with keep-all.)
COMMANDS = QoSProfile(history=HistoryPolicy.KEEP_ALL, depth=100,
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

#: The goal, result and cancel services of action servers that take requests from many clients
#: (`generate`): as deep as COMMANDS. With rclpy's default (depth 10) a burst of goals overflows the
#: server's request history and goals vanish without an answer: test/test_reliability.py lost 36 of
#: 50 goals sent by 4 clients at once; with depth 100, none.
ACTION_SERVICES = COMMANDS

#: Engine builder status: reliable and transient local with depth 1, so a node that subscribes after
#: the build finished still gets the last state.
ENGINE_STATUS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                           reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.TRANSIENT_LOCAL)

#: Camera frames: best effort, newest only. A best-effort subscription matches both reliable and
#: best-effort publishers (drivers use either), and depth 1 keeps only the newest frame.
CAMERA = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                    reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE)

#: Camera frames from a reliable publisher only (``camera_qos: reliable``): depth 1, reliable. Large
#: best-effort samples (a 640x480 rgb8 frame is 900 KB, dozens of UDP fragments) are dropped whole
#: when one fragment is lost; measured here on loopback: 13 of 30 frames/s arrive best-effort, 30 of
#: 30 reliable.
CAMERA_RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                             reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)

#: Node health on /diagnostics: reliable, volatile, depth 10 (what diagnostic_updater and the
#: diagnostic aggregator use; a status is republished every second, so nothing needs to be kept).
DIAGNOSTICS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                         reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
