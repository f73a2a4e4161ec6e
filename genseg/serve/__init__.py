"""Real-time segmentation behind a Vertex AI custom-container compatible HTTP server."""
