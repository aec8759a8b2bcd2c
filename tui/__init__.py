"""The dnet console (Textual). Talks to a head over HTTP only."""
