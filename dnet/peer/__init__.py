"""The peer daemon: transport + protocol + runtime."""
