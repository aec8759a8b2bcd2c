"""Links between processes: bytes in, bytes out. WebSocket for real, memory for tests."""
