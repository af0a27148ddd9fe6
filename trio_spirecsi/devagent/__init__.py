"""An embedded SPIRE agent stand-in: a CA, registration entries, rotation, and the
Delegated Identity API on a unix socket, for demos, tests and benchmarks.

Import :class:`trio_spirecsi.devagent.agent.DevAgent` for the server; the CA and
entries modules have no gRPC dependency.
"""
