"""`vlaflow serve`: a trained model behind a websocket policy server, and its client."""
