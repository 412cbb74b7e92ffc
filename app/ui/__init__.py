"""The web console at /ui: one static page that drives the public API with the user's own API key."""
