"""Small apps that stand behind sidecars in integration tests (run as scripts, by path)."""
