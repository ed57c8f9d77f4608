"""The SGL method: pure tensor code plus transformers seams; knows nothing of lmms-eval."""
