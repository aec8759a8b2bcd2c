"""The head: connects to peers, loads a model across them, runs generation sessions."""
