"""Hostile clients for the driver's per-pod Workload API socket, and the node they attack.

- :mod:`.wire`: raw HTTP/2 on a real unix socket. Frames are built byte by byte (so a test
  can send what no HTTP/2 library would: non-UTF-8 header bytes, 16 MiB unknown frames,
  endless CONTINUATION chains) and the driver's answers are parsed with ``hyperframe`` and
  ``hpack``, h2's own frame and header libraries.
- :mod:`.attacks`: the attacks, each a plain function that runs one hostile client against a
  socket and returns what that client saw (GOAWAY, RST_STREAM codes, gRPC statuses, whether
  the driver ended the connection).
- :mod:`.node`: the real driver process and a dev agent process on a tmpfs state dir, with
  an attacker pod (Workload API socket on) and a victim pod, and what can be observed of
  them from outside: liveness, CSI Probe, the victim's rotation, descriptors and RSS.

Both ``tests/test_hostile.py`` and ``benchmarks/hostile.py`` (``just hostile``) use them.
"""
