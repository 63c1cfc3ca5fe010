"""Model families behind one adapter interface, and the tiny-model builder used by tests and the demo."""
