"""The Gradio app: it calls the same public functions as the CLI (mapped to `studio.ui`)."""
