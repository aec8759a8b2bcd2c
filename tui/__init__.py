"""The dnet console: a Textual dashboard that reads a head over its HTTP API only."""
